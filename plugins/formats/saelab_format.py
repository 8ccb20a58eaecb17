"""The ``saelab`` dictionary format: a directory with ``cfg.json`` and ``dictionary.safetensors``.

``cfg.json`` holds ``format`` ("saelab"), ``format_version``, ``saelab_version``, ``architecture``
(a registered architecture name), ``sites`` (inputs, outputs, d_in, d_out), ``options`` (the
architecture's options), ``d_sae`` and ``metadata`` (normalisation, training info...).
``dictionary.safetensors`` holds the module's ``state_dict`` (parameters and persistent buffers).
No pickle is involved; loading rebuilds the module from the architecture registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from saelab import DictionaryFormat, SparseDictionary, UsageError, hookimpl
from saelab.dictionary import FORMAT_NAME, build_dictionary
from saelab.fileio import save_safetensors_atomic
from saelab.formats import has_files, read_json, require_format_dir
from saelab.manager import saelab_version
from safetensors.torch import load_file

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "dictionary.safetensors"
FORMAT_VERSION = 1


class SaelabFormat(DictionaryFormat):
    """saelab's own format: cfg.json + dictionary.safetensors (any registered architecture)."""

    name = FORMAT_NAME

    @classmethod
    def detect(cls, path: Path) -> bool:
        """A directory whose cfg.json says ``"format": "saelab"`` next to dictionary.safetensors; also
        one whose cfg.json is not valid JSON (``dictionary.safetensors`` is saelab's name), so that
        loading names the broken file instead of finding no dictionary."""
        path = Path(path)
        if not has_files(path, CFG_FILE, WEIGHTS_FILE):
            return False
        try:
            cfg = json.loads((path / CFG_FILE).read_text())
        except (OSError, ValueError):
            return True
        return isinstance(cfg, dict) and cfg.get("format") == FORMAT_NAME

    def save(self, dictionary: SparseDictionary, path: Path) -> None:
        """Write cfg.json and dictionary.safetensors into directory ``path`` (created if needed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "saelab_version": saelab_version()}
        cfg.update(dictionary.config())
        state = {k: v.detach().contiguous().cpu() for k, v in dictionary.state_dict().items()}
        save_safetensors_atomic(path / WEIGHTS_FILE, state, metadata={"format": FORMAT_NAME})
        (path / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")

    def load(self, path: Path, device: str | torch.device = "cpu") -> SparseDictionary:
        """Rebuild the architecture from cfg.json and load its weights."""
        path = Path(path)
        require_format_dir(self.detect(path), path, "saelab",
                           f"{CFG_FILE} with \"format\": \"saelab\" and {WEIGHTS_FILE}")
        cfg = read_json(path / CFG_FILE)
        missing_keys = [key for key in ("architecture", "sites") if key not in cfg]
        if missing_keys:
            raise UsageError(f"{str(path / CFG_FILE)!r} has no {' and no '.join(map(repr, missing_keys))}; "
                             f"a saelab cfg.json holds format, architecture, sites, options and d_sae")
        module = build_dictionary(cfg["architecture"], cfg["sites"], cfg.get("options", {}))
        try:
            state = load_file(str(path / WEIGHTS_FILE), device="cpu")
        except Exception as exc:  # truncated or corrupt files raise several exception types
            raise UsageError(f"cannot read weights {str(path / WEIGHTS_FILE)!r} (corrupt or truncated): "
                             f"{type(exc).__name__}: {exc}") from None
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UsageError(f"{str(path / WEIGHTS_FILE)!r} does not match architecture "
                             f"{cfg['architecture']!r}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        if cfg.get("metadata"):
            module.extra_config.update(cfg["metadata"])
        return module.to(device)


@hookimpl
def register_dictionary_formats(register):
    """Register the ``saelab`` format."""
    register(SaelabFormat)
