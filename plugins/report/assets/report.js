// saelab report: builds the sortable, filterable latent table from the inlined JSON and shows token
// activations on hover. Runs from file:// with no network. Every piece of data goes into the page
// through textContent or setAttribute, never innerHTML, so dataset and LLM text cannot run.
(function () {
  "use strict";

  function readData() {
    var el = document.getElementById("report-data");
    if (!el) return null;
    return JSON.parse(el.textContent);
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || (typeof value === "number" && !isFinite(value))) return "";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return String(value);
    var d = digits === undefined ? 3 : digits;
    if (value !== 0 && (Math.abs(value) < Math.pow(10, -d) || Math.abs(value) >= 1e5)) {
      return value.toExponential(Math.max(1, d - 1));
    }
    return value.toFixed(d);
  }

  function buildTable(data) {
    var table = document.getElementById("latent-table");
    if (!table) return;
    var multiHook = data.hookpoints.length > 1;
    var columns = [];
    if (multiHook) columns.push({ key: "hookpoint", label: "hookpoint", type: "text", get: function (r) { return r.hookpoint; } });
    columns.push({ key: "latent", label: "latent", type: "num", get: function (r) { return r.latent; } });
    columns.push({ key: "explanation", label: "explanation", type: "text", get: function (r) { return r.explanation; } });
    data.scorers.forEach(function (s) {
      columns.push({ key: "score:" + s, label: s, type: "num", get: function (r) { return r.scores[s]; },
                     failures: function (r) { return (r.failures || {})[s] || null; } });
    });
    columns.push({ key: "frequency", label: "frequency", type: "num", digits: 5, get: function (r) { return r.frequency; } });
    columns.push({ key: "max_activation", label: "max activation", type: "num", get: function (r) { return r.max_activation; } });

    var thead = table.tHead, tbody = table.tBodies[0];
    var headRow = document.createElement("tr");
    columns.forEach(function (col, idx) {
      var th = document.createElement("th");
      th.textContent = col.label;
      th.setAttribute("data-key", col.key);
      th.setAttribute("aria-sort", "none");
      th.setAttribute("title", "sort by " + col.label);
      th.addEventListener("click", function () { sortBy(idx); });
      headRow.appendChild(th);
    });
    thead.appendChild(headRow);

    var rows = data.latents.map(function (r) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-latent", String(r.latent));
      tr.setAttribute("data-hookpoint", r.hookpoint);
      columns.forEach(function (col) {
        var td = document.createElement("td");
        var value = col.get(r);
        if (col.key === "latent") {
          var a = document.createElement("a");
          a.setAttribute("href", r.href);
          a.className = "latent-link";
          a.textContent = String(r.latent);
          td.appendChild(a);
        } else if (col.key === "explanation") {
          td.className = "expl llm-text";
          if (value === null || value === undefined) {
            td.textContent = "(not explained)";
            td.classList.add("muted");
          } else {
            td.textContent = value;
          }
        } else {
          td.textContent = col.type === "num" ? fmt(value, col.digits) : (value || "");
          if (col.type === "num") td.className = "num";
          var failed = col.failures ? col.failures(r) : null;
          if (failed) {  // some prompts of this score failed: say so, above all where there is no value
            var note = document.createElement("span");
            note.className = "failed";
            note.textContent = (td.textContent ? " " : "") + failed;
            td.appendChild(note);
            td.setAttribute("title", failed);
          }
        }
        tr.appendChild(td);
      });
      var haystack = [r.hookpoint, String(r.latent), r.explanation || ""].join(" ").toLowerCase();
      return { el: tr, data: r, text: haystack };
    });
    rows.forEach(function (row) { tbody.appendChild(row.el); });

    var state = { col: -1, dir: 1 };
    function compare(a, b, col) {
      var va = col.get(a.data), vb = col.get(b.data);
      var na = va === null || va === undefined || va === "", nb = vb === null || vb === undefined || vb === "";
      if (na || nb) return na === nb ? 0 : (na ? 1 : -1);  // missing values last in both directions
      if (col.type === "num") return (va - vb) * state.dir;
      return String(va).localeCompare(String(vb)) * state.dir;
    }
    function sortBy(idx) {
      state.dir = state.col === idx ? -state.dir : (columns[idx].type === "num" && columns[idx].key !== "latent" ? -1 : 1);
      state.col = idx;
      var col = columns[idx];
      rows.sort(function (a, b) { return compare(a, b, col) || (a.data.latent - b.data.latent); });
      rows.forEach(function (row) { tbody.appendChild(row.el); });
      Array.prototype.forEach.call(headRow.children, function (th, i) {
        th.setAttribute("aria-sort", i === idx ? (state.dir > 0 ? "ascending" : "descending") : "none");
      });
    }

    var input = document.getElementById("filter");
    var count = document.getElementById("count");
    function applyFilter() {
      var q = input ? input.value.trim().toLowerCase() : "";
      var shown = 0;
      rows.forEach(function (row) {
        var ok = !q || row.text.indexOf(q) !== -1;
        row.el.hidden = !ok;
        if (ok) shown += 1;
      });
      if (count) count.textContent = shown + " of " + rows.length + " latents shown";
    }
    if (input) input.addEventListener("input", applyFilter);
    applyFilter();
  }

  function tooltips() {
    var tip = document.getElementById("tooltip");
    if (!tip) return;
    document.addEventListener("mouseover", function (ev) {
      var t = ev.target;
      if (!t || !t.classList || !t.classList.contains("tok")) { tip.hidden = true; return; }
      tip.textContent = JSON.stringify(t.textContent) + "  " + t.getAttribute("data-act");
      tip.hidden = false;
    });
    document.addEventListener("mousemove", function (ev) {
      tip.style.left = (ev.clientX + 12) + "px";
      tip.style.top = (ev.clientY + 12) + "px";
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var data = readData();
    if (data && document.body.getAttribute("data-page") === "index") buildTable(data);
    tooltips();
  });
})();
