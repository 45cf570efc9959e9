// The Explore page's filters, in plain JavaScript with nothing fetched: each row of the table
// carries its task, data set, base model, method family and method as data-* attributes, and
// its searchable text. The filters are mirrored in the URL (?task=sentiment&method=lora&q=...)
// so a filtered view can be linked, and each option says how many adapters it would leave.
(function () {
  "use strict";
  const FACETS = ["task", "dataset", "model", "family", "method"];

  function setUpFilters(form) {
    const rows = Array.from(document.querySelectorAll("#adapters tbody tr"));
    const shown = document.getElementById("shown");
    const none = document.getElementById("none");
    const permalink = document.getElementById("permalink");

    const chosen = () => Object.fromEntries(FACETS.map((key) => [key, form.elements[key].value]));
    const words = () => form.elements.q.value.toLowerCase().split(/\s+/).filter(Boolean);
    const fits = (row, picked, terms, except) =>
      FACETS.every((key) => key === except || !picked[key] || row.dataset[key] === picked[key]) &&
      terms.every((term) => row.dataset.text.includes(term));

    function apply() {
      const picked = chosen();
      const terms = words();
      let count = 0;
      for (const row of rows) {
        row.hidden = !fits(row, picked, terms);
        count += row.hidden ? 0 : 1;
      }
      shown.textContent = String(count);
      none.hidden = count > 0;
      for (const key of FACETS) {  // what each option would leave, the other filters kept
        for (const option of form.elements[key].options) {
          if (!option.value) continue;
          const left = rows.filter((row) => row.dataset[key] === option.value && fits(row, picked, terms, key)).length;
          option.textContent = `${option.value} (${left})`;
        }
      }
      const params = new URLSearchParams();
      for (const key of FACETS) if (picked[key]) params.set(key, picked[key]);
      if (terms.length) params.set("q", form.elements.q.value.trim());
      const query = params.toString();
      permalink.href = "index.html" + (query ? "?" + query : "");
      try {
        history.replaceState(null, "", query ? "?" + query : location.pathname);
      } catch (error) {
        // Some browsers refuse to change a file:// URL; the "link to this view" link still has it.
      }
    }

    const params = new URLSearchParams(location.search);
    for (const key of FACETS) {
      const value = params.get(key) || "";
      const select = form.elements[key];
      if (value && !Array.from(select.options).some((option) => option.value === value)) {
        select.add(new Option(`${value} (0)`, value));  // a link to a value the index lacks: show it matches nothing
      }
      select.value = value;
    }
    form.elements.q.value = params.get("q") || "";
    form.addEventListener("change", apply);
    form.addEventListener("input", apply);
    form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
    form.addEventListener("reset", () => setTimeout(apply, 0));
    apply();
  }

  // "copy" buttons beside the load lines.
  function setUpCopying() {
    for (const button of document.querySelectorAll("button.copy")) {
      button.addEventListener("click", () => {
        const text = document.getElementById(button.dataset.copy).textContent;
        const done = () => { button.textContent = "copied"; setTimeout(() => { button.textContent = "copy"; }, 1500); };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(done);
        } else {  // file:// pages are no secure context: select the text for Ctrl+C
          const range = document.createRange();
          range.selectNodeContents(document.getElementById(button.dataset.copy));
          window.getSelection().removeAllRanges();
          window.getSelection().addRange(range);
        }
      });
    }
  }

  const form = document.getElementById("filters");
  if (form) setUpFilters(form);
  setUpCopying();
})();
