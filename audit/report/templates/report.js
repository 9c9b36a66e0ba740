// The report's only script: sorting and filtering the findings table, paging the gallery and opening an image.
// Progressive: without it (print, or scripts off) the table is in its default order and every image is shown.
(() => {
  "use strict";
  const LEVEL = { none: 0, watch: 1, shortcut: 2 };

  const table = document.getElementById("findings");
  if (table) {
    const toolbar = document.querySelector(".toolbar");
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    const headers = Array.from(table.tHead.rows[0].cells);
    const filter = document.getElementById("findings-filter");
    const verdict = document.getElementById("verdict-filter");
    const count = document.getElementById("findings-count");
    const key = (row, index, numeric) => {
      const cell = row.cells[index];
      if (!numeric) return cell.textContent.trim().toLowerCase();
      const value = cell.dataset.sort;
      return value === undefined || value === "" ? null : Number(value);
    };
    headers.forEach((header, index) => {
      header.querySelector("button.sort").addEventListener("click", () => {
        const numeric = header.hasAttribute("data-numeric");
        const current = header.getAttribute("aria-sort");
        // Numbers sort largest first on the first click (the most serious first), words A to Z.
        const ascending = current ? current === "descending" : !numeric;
        headers.forEach((h) => h.removeAttribute("aria-sort"));
        header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        const sorted = rows.slice().sort((a, b) => {
          const x = key(a, index, numeric);
          const y = key(b, index, numeric);
          if (x === null || y === null) return (x === null) - (y === null); // missing values last, both ways
          const order = x < y ? -1 : x > y ? 1 : 0;
          return ascending ? order : -order;
        });
        body.append(...sorted);
      });
    });
    const applyFilter = () => {
      const words = filter.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
      const minimum = verdict.value === "shortcut" ? 2 : verdict.value === "watch" ? 1 : 0;
      let shown = 0;
      for (const row of rows) {
        const text = Array.from(row.cells).slice(0, 4).map((c) => c.textContent.toLowerCase()).join(" ");
        const visible = words.every((w) => text.includes(w)) && LEVEL[row.dataset.verdict] >= minimum;
        row.hidden = !visible;
        shown += visible ? 1 : 0;
      }
      count.textContent = `showing ${shown} of ${rows.length} findings`;
    };
    filter.addEventListener("input", applyFilter);
    verdict.addEventListener("change", applyFilter);
    toolbar.hidden = false;
    applyFilter();
  }

  for (const group of document.querySelectorAll(".gallery-group")) {
    const pages = Number(group.dataset.pages);
    const items = Array.from(group.querySelectorAll(".gallery-item"));
    const pager = group.querySelector(".pager");
    let page = 0;
    const show = () => {
      items.forEach((item) => { item.hidden = Number(item.dataset.page) !== page; });
      if (pager) {
        pager.querySelector(".page-label").textContent = `page ${page + 1} of ${pages}`;
        pager.querySelector(".prev").disabled = page === 0;
        pager.querySelector(".next").disabled = page === pages - 1;
      }
    };
    if (pager) {
      pager.hidden = false;
      pager.querySelector(".prev").addEventListener("click", () => { page = Math.max(0, page - 1); show(); });
      pager.querySelector(".next").addEventListener("click", () => { page = Math.min(pages - 1, page + 1); show(); });
    }
    show();
  }

  const dialog = document.getElementById("gallery-dialog");
  if (dialog) {
    const large = dialog.querySelector(".large");
    const slot = dialog.querySelector(".slot");
    for (const button of document.querySelectorAll(".gallery-item button.open")) {
      button.addEventListener("click", () => {
        const item = button.closest(".gallery-item");
        large.replaceChildren(button.querySelector("img").cloneNode());
        slot.replaceChildren(item.querySelector("template.detail").content.cloneNode(true));
        dialog.showModal();
      });
    }
  }
})();
