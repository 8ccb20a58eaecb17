"""Non-English text: characters split across byte-level BPE tokens are decoded whole (Greek, CJK,
emoji, RTL marks), highlighted whole in prompts and the report, and control characters never reach a
prompt or a page raw."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fixtures.tiny_models import TINY_GPT2, TINY_LLAMA
from saelab import UsageError
from saelab.autointerp import display_activations, display_tokens, highlighted_text, plain_text
from saelab.examples import REPLACEMENT_CHAR, TokenDecoder
from saelab.records import Example, LatentRecord, LatentStats

TEXT = "Ελληνικά 日本語 🙂 \u200f ok"
ENGLISH = "the cat sat on the mat, twice."


def _tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _smollm2_dir() -> Path:
    from saelab.plugins.models.transformers_models import smollm2_dir

    path = smollm2_dir()
    if not (path / "tokenizer.json").is_file():
        pytest.skip("the embedded SmolLM2 is not converted on this machine")
    return path


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama", "smollm2"])
def tokenizer(request):
    paths = {"tiny-gpt2": TINY_GPT2, "tiny-llama": TINY_LLAMA}
    return _tokenizer(paths[request.param] if request.param in paths else _smollm2_dir())


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_split_characters_decode_whole_and_round_trip(tokenizer):
    decoder = TokenDecoder(tokenizer)
    ids = _ids(tokenizer, TEXT)
    assert any(REPLACEMENT_CHAR in s for s in decoder(ids))  # the tokenizer does split characters
    strs, spans = decoder.decode_window(ids)
    assert "".join(strs) == TEXT and not any(REPLACEMENT_CHAR in s for s in strs)
    assert spans and all(b - a >= 2 and all(s == "" for s in strs[a + 1:b]) for a, b in spans)
    example = Example(id="e", sequence=0, start=0, tokens=ids, token_strs=strs, activations=[0.0] * len(ids),
                      char_spans=spans)
    assert plain_text(example) == TEXT and example.text == TEXT
    shown = display_tokens(example)
    assert {"\u0395", "\u65e5", "\U0001f642"} <= {ch for t in shown for ch in t}
    assert all(t for t in shown)  # every span shows text: no empty continuation pieces
    english = _ids(tokenizer, ENGLISH)
    assert decoder.decode_window(english) == (decoder(english), [])  # English text is unchanged


def test_characters_cut_by_the_window_edge_show_whole(tokenizer):
    decoder = TokenDecoder(tokenizer)
    ids = _ids(tokenizer, TEXT)
    for cut in range(1, 8):
        for end in (len(ids) - 1, len(ids)):
            strs, spans = decoder.decode_window(ids[cut:end], ids[:cut][-3:], ids[end:])
            assert not any(REPLACEMENT_CHAR in s for s in strs), (cut, end, strs)
            assert all(0 <= a < b <= end - cut for a, b in spans)


def _example(tok, text: str, hot: str, *, eid: str = "e", which: int = -1, value: float = 5.0) -> Example:
    """An example of ``text`` (tiny tokenizer) that fires only on the ``which`` token of the character ``hot``."""
    decoder = TokenDecoder(tok)
    ids = _ids(tok, text)
    strs, spans = decoder.decode_window(ids)
    start = "".join(strs).index(hot)
    span = next((a, b) for a, b in spans if len("".join(strs[:a])) <= start < len("".join(strs[:b])))
    acts = [0.0] * len(ids)
    acts[list(range(*span))[which]] = value
    return Example(id=eid, sequence=0, start=0, tokens=ids, token_strs=strs, activations=acts, char_spans=spans)


def test_a_highlight_on_any_token_of_a_character_covers_it_whole():
    tok = _tokenizer(TINY_GPT2)
    for which in (0, 1, -1):
        example = _example(tok, "we say 日本 here", "日", which=which)
        assert highlighted_text(example) == "we say <<日>>本 here"
        assert max(display_activations(example)) == 5.0
        assert len(display_activations(example)) == len(display_tokens(example)) < len(example.tokens)


def test_control_characters_are_escaped_in_prompts():
    ex = Example(id="c", sequence=0, start=0, tokens=[1, 2, 3, 4, 5],
                 token_strs=["a", "\x00", "b\x1b[31m", "\u2028", "\n"], activations=[0, 0, 1.0, 0, 0])
    assert plain_text(ex) == "a\\x00b\\x1b[31m\\u2028\\n"
    assert highlighted_text(ex) == "a\\x00<<b\\x1b[31m>>\\u2028\\n"


def test_example_char_spans_are_stored_only_when_present_and_validated():
    plain = Example(id="p", sequence=0, start=0, tokens=[1, 2], token_strs=["a", "b"], activations=[0, 1])
    assert "char_spans" not in plain.to_dict()  # records (and fingerprints) of other text are unchanged
    split = Example(id="s", sequence=0, start=0, tokens=[1, 2, 3], token_strs=["日", "", "x"],
                    activations=[0, 1, 0], char_spans=[(0, 2)])
    again = Example.from_dict(json.loads(json.dumps(split.to_dict())))
    assert again.char_spans == [(0, 2)] and again == split
    old = {k: v for k, v in split.to_dict().items() if k != "char_spans"}
    assert Example.from_dict(old).char_spans == []  # records written before the field existed
    for bad in ([[0, 1]], [[1, 4]], [[0, 2], [1, 3]]):
        with pytest.raises(UsageError, match="char span"):
            Example.from_dict({**split.to_dict(), "char_spans": bad})


# --------------------------------------------------------------------------------------------------
# Through the CLI: prompts sent to the LLM and the report


def _unicode_run(results_dir: Path) -> Path:
    """A run holding one latent whose examples are Greek/Japanese/emoji text, firing on a continuation
    token of a split character; one example carries a NUL byte."""
    from saelab.layout import RunLayout
    from saelab.pipeline import RecordSet, save_records

    tok = _tokenizer(TINY_GPT2)
    texts = [("Ελληνικά 日本語 🙂 \u200f ok", "日"), ("γράμμα 本 and more 🙂", "本"), ("the 日 sun\x00here", "日")]
    activating = [_example(tok, t, hot, eid=f"a{i}", which=-1, value=4.0 + i) for i, (t, hot) in enumerate(texts)]
    for e in activating:
        e.quantile = 0
    non = []
    for i, text in enumerate(["καλημέρα κόσμε", "こんにちは", "plain words only"]):
        ids = _ids(tok, text)
        strs, spans = TokenDecoder(tok).decode_window(ids)
        non.append(Example(id=f"n{i}", sequence=10 + i, start=0, tokens=ids, token_strs=strs,
                           activations=[0.0] * len(ids), is_activating=False, char_spans=spans))
    record = LatentRecord(hookpoint="layers.1", latent=0, train=activating, test=activating, non_activating=non,
                          stats=LatentStats(frequency=0.01, max_activation=6.0, firing_count=3, n_tokens=300))
    layout = RunLayout(results_dir / "run")
    save_records(layout, RecordSet("layers.1", [record], {}, "fp"))
    (layout.root / "run_config.json").write_text(json.dumps({"commands": {}}))
    return layout.root


_SIM_LINE = re.compile(r"Example (\d+) \((\d+) tokens\): (\[.*\])")


def test_prompts_show_split_characters_whole_through_the_cli(cli, results_dir):
    from llm_server import ScriptedLLMServer
    from pipeline_helpers import kind_of

    _unicode_run(results_dir)

    def answer(request):
        kind = kind_of(request)
        user = str(request["messages"][-1]["content"])
        if kind == "explain":
            return "[EXPLANATION]: the Japanese character for sun"
        if kind == "simulation":  # one value per listed token: 10 on the first 日 or 本 (where the latent fires)
            lines = []
            for m in _SIM_LINE.finditer(user):
                tokens = json.loads(m.group(3))
                assert len(tokens) == int(m.group(2))
                first = next((i for i, t in enumerate(tokens) if t in ("日", "本")), -1)
                lines.append(f"Example {m.group(1)}: [{', '.join('10' if i == first else '0' for i in range(len(tokens)))}]")
            return "\n".join(lines)
        n = len(re.findall(r"^Example \d+:", user, re.MULTILINE))
        return "[" + ", ".join(["1"] * n) + "]"

    args = ["--explainer_provider", "openai", "--explainer_model", "test-model", "--verbose", "false",
            "--provider_option", "max_retries", "0"]
    env = {"OPENAI_API_KEY": "sk-test"}
    with ScriptedLLMServer(answer) as server:
        r = cli("explain", "run", "--explainer_api_base_url", server.base_url, *args,
                "--explainer_option", "show_activations", "true", env=env)
        assert r.exit_code == 0, r.output
        r = cli("score", "run", "--scorers", "simulation,fuzz", "--explainer_api_base_url", server.base_url,
                *args, env=env)
        assert r.exit_code == 0, r.output
        prompts = [str(req.body["messages"][-1]["content"]) for req in server.chat_requests]
    explain = prompts[0]
    assert "Example 1: Ελληνικά <<日>>本語 🙂 \u200f ok" in explain
    assert "Example 3: the <<日>> sun\\x00here" in explain
    assert '("日", 7)' in explain and '("本", 9)' in explain  # Activations: whole characters, max of their tokens
    for prompt in prompts:
        assert REPLACEMENT_CHAR not in prompt and "\x00" not in prompt
        assert re.search("[α-ωΑ-Ω]", prompt) and re.search("[日本こ]", prompt)
    from saelab.records import ScoreResult

    sim = ScoreResult.load(results_dir / "run" / "scores" / "simulation" / "layers.1" / "latent_0.json")
    assert sim.failures.prompts == 0 and all(p.values is not None for p in sim.predictions)
    assert sim.metrics["correlation"] > 0.95  # per-span truths: the max over each span's tokens


def test_report_shows_split_characters_and_escapes_controls(cli, results_dir):
    run = _unicode_run(results_dir)
    r = cli("report", str(run))
    assert r.exit_code == 0, r.output
    page = (run / "report" / "latents" / "layers.1" / "latent_0.html").read_text(encoding="utf-8")
    assert REPLACEMENT_CHAR not in page and "\x00" not in page
    assert re.search(r'<span class="tok on" data-act="4" title="4"[^>]*>日</span>', page)
    assert ">\\x00</span>" in page  # the NUL is shown as an escape
    for word in ("Ελληνικά", "こんにちは", "καλημέρα"):
        pieces = re.findall(r'<span class="tok[^"]*"[^>]*>([^<]*)</span>', page)
        assert word in "".join(pieces)
    assert all(ord(ch) >= 0x20 or ch in "\n\t" for ch in page)
