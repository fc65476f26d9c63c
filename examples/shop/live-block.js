// segflow live block: re-renders a content block when the visitor's
// segments change, without a page reload.
//
// <div data-segflow-slot="home_hero">…server-rendered content…</div>
// <script src="/live-block.js"></script>
//
// The page's own server proxies two things (so the API token never reaches
// the browser): `/events`, the visitor's segment diffs (segflow's
// `/v1/diffs/stream?id=…`, server-sent events), and `/blocks`, the visitor's
// current decisions (segflow's `/v1/decide?slots=…&id=…`).
(function () {
  "use strict";
  const blocks = Array.from(document.querySelectorAll("[data-segflow-slot]"));
  if (!blocks.length || !window.EventSource) return;
  const slots = blocks.map(b => b.dataset.segflowSlot).join(",");
  let pending = null;

  function render(block, decision) {
    const raw = decision.content;
    const c = typeof raw === "string" ? {headline: raw} : (raw || {});
    block.dataset.variant = decision.variant;
    block.hidden = !(c.headline || c.text || c.link);
    const h = block.querySelector("[data-field=headline], [data-field=text]");
    if (h) h.textContent = c.headline || c.text || "";
    const a = block.querySelector("a[data-field=link]");
    if (a && c.link) { a.href = c.link; a.textContent = c.cta || c.link; }
  }

  async function refresh() {
    pending = null;
    const r = await fetch("/blocks?slots=" + encodeURIComponent(slots), {cache: "no-store"});
    if (!r.ok) return;
    const answer = await r.json();
    blocks.forEach(b => { const d = answer.decisions[b.dataset.segflowSlot]; if (d) render(b, d); });
  }

  function listen() {
    const events = new EventSource("/events");
    // Several diffs of one commit come together: one refresh for them.
    const later = () => { if (!pending) pending = setTimeout(refresh, 50); };
    events.addEventListener("diff", later);
    // A merge moved the visitor to another profile.
    events.addEventListener("profile", later);
    // segflow stopped serving (its last event says why): listen again
    // later, for when it is back.
    events.addEventListener("end", () => { events.close(); setTimeout(listen, 15000); });
    // The shop answers 503 while segflow is away: a browser does not try a
    // failed EventSource again by itself, so this does, every 15 s.
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) setTimeout(listen, 15000);
    };
  }
  listen();
})();
