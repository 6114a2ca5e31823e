// The dashboard's one script. A file, not inline: the CSP allows scripts from this function only.
// Without it every page still works (reload to update; the bulk confirmation is a page of its own).
"use strict";

// Ask before a form that says so (a cancel) is sent.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});

// --- bulk selection on the jobs list ------------------------------------------------------------

function updatePicked() {
  const form = document.getElementById("bulk");
  if (!form) return;
  const boxes = form.querySelectorAll('tbody input[name="id"]');
  const picked = form.querySelectorAll('tbody input[name="id"]:checked').length;
  document.getElementById("picked").textContent = picked
    ? `${picked} selected`
    : "select jobs to retry or cancel them together";
  for (const button of form.querySelectorAll('button[name="action"]')) button.disabled = picked === 0;
  const all = document.getElementById("pick-all");
  if (all) {
    all.checked = boxes.length > 0 && picked === boxes.length;
    all.indeterminate = picked > 0 && picked < boxes.length;
  }
}

document.addEventListener("change", (event) => {
  if (event.target.id === "pick-all") {
    for (const box of document.querySelectorAll('#bulk tbody input[name="id"]')) {
      box.checked = event.target.checked;
    }
  }
  updatePicked();
});

// --- live regions ---------------------------------------------------------------------------------
// A live page's <main data-live="x.json?..."> names its JSON twin: {"regions": {element id: html},
// "final": bool}. Each region is replaced by the server's HTML (escaped there, as on the page),
// keeping what the operator did inside it: ticked boxes and opened details.

const shown = new WeakMap();

function replaceRegion(element, html) {
  if (!element || shown.get(element) === html) return;
  const ticked = new Set([...element.querySelectorAll("input[type=checkbox]:checked")].map((b) => b.value));
  const opened = new Set([...element.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  element.innerHTML = html;
  shown.set(element, html);
  for (const box of element.querySelectorAll("input[type=checkbox]")) {
    if (ticked.has(box.value)) box.checked = true;
  }
  for (const details of element.querySelectorAll("details[data-key]")) {
    if (opened.has(details.dataset.key)) details.open = true;
  }
}

function goLive(main) {
  const every = Number(main.dataset.liveEvery) || 2000;
  const badge = document.getElementById("live-status");
  const later = (ms) => window.setTimeout(tick, ms);

  async function tick() {
    if (document.hidden) return later(every); // no polling from a background tab
    try {
      const response = await fetch(main.dataset.live, { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      for (const [id, html] of Object.entries(data.regions)) replaceRegion(document.getElementById(id), html);
      updatePicked();
      badge.className = data.final ? "live-status final" : "live-status";
      badge.textContent = data.final ? "final" : "live";
      badge.title = data.final ? "nothing here changes any more; checked every few seconds" : "updates itself";
      later(data.final ? every * 5 : every); // a final job can still be retried by someone else
    } catch (error) {
      badge.className = "live-status paused";
      badge.textContent = "paused";
      badge.title = `live updates paused (${error.message}); retrying`;
      later(every * 5);
    }
  }
  later(every);
}

updatePicked();
const liveMain = document.querySelector("main[data-live]");
if (liveMain) goLive(liveMain);
