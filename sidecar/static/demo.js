// The demo job board: every job on `demo:board`, each job's own channel, all through one Realtime client.
// Rendering is coalesced: channel callbacks only mark what changed, and one requestAnimationFrame draws it.
import { Realtime } from "/static/realtime.js";

const $ = (id) => document.getElementById(id);
const rt = new Realtime(); // this page's origin: the sidecar that served it
const reports = new Map(); // task id -> { sub, card, state }
const page = { rt, reports, renders: 0, sprintMessages: [], imports: { channel: null, sub: null, state: null } };
window.demo = page; // for the browser tests, and for poking around in the console
const log = [];

// -- rendering, once per frame ------------------------------------------------------------------------------
const dirty = new Set();
let frameRequested = false;
function schedule(what) {
  dirty.add(what);
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(() => {
    frameRequested = false;
    const todo = [...dirty];
    dirty.clear();
    for (const draw of todo) draw();
    page.renders += 1;
    drawCounters();
  });
}

function drawCounters() {
  const s = rt.stats;
  $("count-messages").textContent = s.messages;
  $("count-published").textContent = s.published;
  $("count-frames").textContent = s.frames;
  $("count-renders").textContent = page.renders;
  $("count-reconnects").textContent = s.reconnects;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function note(text) {
  log.unshift(text);
  log.length = Math.min(log.length, 15);
  schedule(drawLog);
}

function drawLog() {
  $("log-list").replaceChildren(...log.map((line) => el("li", {}, line)));
}

// -- connection ---------------------------------------------------------------------------------------------
rt.addEventListener("connection", (e) => {
  const { status, transport, delay, reason } = e.detail;
  const badge = $("connection");
  badge.dataset.status = status;
  badge.dataset.transport = transport || badge.dataset.transport || "";
  badge.textContent = status === "reconnecting" ? `reconnecting in ${(delay / 1000).toFixed(1)} s (${reason})`
    : status === "open" ? `live over ${transport === "ws" ? "WebSocket" : "SSE"}` : status;
  schedule(drawCounters);
});

// -- the board: which jobs exist ----------------------------------------------------------------------------
rt.subscribe("demo:board", {
  onState: (board) => syncJobs(board?.jobs || {}),
  onEvent: (name, job) => job && note(`${job.kind} started by ${job.by}: ${job.channel}`),
});

function syncJobs(jobs) {
  const list = Object.values(jobs).sort((a, b) => b.started - a.started);
  for (const job of list.filter((j) => j.kind === "report")) if (!reports.has(job.id)) addReport(job);
  for (const [id, report] of reports) {
    if (!jobs[id]) {
      report.sub.unsubscribe();
      report.card.remove();
      reports.delete(id);
    }
  }
  const newestImport = list.find((j) => j.kind === "import");
  if (newestImport && newestImport.channel !== page.imports.channel) followImport(newestImport.channel);
  document.querySelector("#reports .empty").hidden = reports.size > 0;
}

// -- reports: a progress bar, then "ready" with the result ----------------------------------------------------
function addReport(job) {
  const card = el("article", { class: "card report", "data-task-id": job.id, "data-status": "PENDING" },
    el("h3", {}, `Report ${job.id.slice(0, 8)}`, el("small", {}, ` by ${job.by}`)),
    el("div", { class: "bar" }, el("div")), el("p", { class: "status" }, "queued"));
  const list = $("report-list");
  const before = [...list.children].find((c) => Number(c.dataset.started) < job.started);
  card.dataset.started = job.started;
  list.insertBefore(card, before || null);
  const report = { card, state: null, seen: [] };
  report.sub = rt.subscribe(job.channel, {
    onState: (state) => {
      report.state = state;
      if (state?.status && state.status !== report.seen.at(-1)) report.seen.push(state.status);
      schedule(() => drawReport(report));
    },
  });
  reports.set(job.id, report);
}

function drawReport({ card, state }) {
  if (!state) return;
  const status = state.status || "PENDING";
  const progress = state.progress || {};
  const done = status === "SUCCESS";
  const pct = done ? 100 : progress.total ? (100 * progress.current) / progress.total : 0;
  card.dataset.status = status;
  card.querySelector(".bar > div").style.width = `${pct}%`;
  const text = card.querySelector(".status");
  if (done) {
    const { rows, url } = state.result || {};
    text.replaceChildren("Ready: ", el("b", {}, `${rows} rows`), " ", el("code", {}, url || ""));
  } else if (status === "FAILURE") {
    text.textContent = `Failed: ${state.error?.type}: ${state.error?.message}`;
  } else {
    text.textContent = progress.message || status.toLowerCase();
  }
}

// -- the sprint: one diff completes it ------------------------------------------------------------------------
let sprint = null;
let changedTasks = new Set();
rt.subscribe("sprint:demo", {
  onMessage: (msg) => {
    page.sprintMessages.push({ event: msg.event, seq: msg.seq, diff: msg.diff, state: msg.state });
    changedTasks = new Set(Object.keys(msg.diff?.tasks || {}));
    if (msg.event === "sprint-completed") {
      const fields = Object.keys(msg.diff || {}).length + changedTasks.size;
      $("sprint-last").textContent = `last change: ${msg.event}, seq ${msg.seq}: one message, ${fields} fields`;
    }
  },
  onState: (state) => {
    sprint = state;
    schedule(drawSprint);
  },
  onEvent: (name) => note(`sprint:demo ${name}`),
});

function drawSprint() {
  if (!sprint) return;
  const card = $("sprint-card");
  card.dataset.completed = sprint.completed_date || "";
  $("sprint-name").textContent = sprint.name || sprint.id;
  $("sprint-dates").textContent = `started ${sprint.started_date}` +
    (sprint.completed_date ? `, completed ${sprint.completed_date}` : ", in progress");
  const tasks = Object.entries(sprint.tasks || {}).sort(([a], [b]) => (a < b ? -1 : 1));
  $("sprint-tasks").replaceChildren(...tasks.map(([id, task]) =>
    el("li", { "data-task": id, "data-status": task.status, class: changedTasks.has(id) ? "flash" : "" },
      el("span", { class: `chip ${task.status}` }, task.status.replace("_", " ")), " ", task.title)));
  changedTasks = new Set();
}

// -- the bulk import: hundreds of diffs, drawn once per frame ----------------------------------------------------
function followImport(channel) {
  const imp = page.imports;
  imp.sub?.unsubscribe();
  Object.assign(imp, { channel, state: null, messages: 0, published: 0, rendersAtStart: page.renders });
  imp.sub = rt.subscribe(channel, {
    onMessage: (msg) => {
      imp.messages += 1;
      imp.published += msg.seq - (msg.seq_from ?? msg.seq) + 1;
    },
    onState: (state) => {
      imp.state = state;
      schedule(drawImport);
    },
  });
}

function drawImport() {
  const { channel, state, messages, published } = page.imports;
  if (!state) return;
  const items = Object.values(state.items || {});
  const ok = items.filter((i) => i.ok).length;
  const card = $("import-card");
  card.dataset.imported = state.imported;
  card.dataset.rows = state.rows;
  $("import-channel").textContent = channel;
  $("import-bar").style.width = `${state.rows ? (100 * state.imported) / state.rows : 0}%`;
  const frames = page.renders - page.imports.rendersAtStart;
  $("import-figures").textContent = `${state.imported} of ${state.rows} rows (${ok} ok, ${items.length - ok} ` +
    `rejected) from ${published} diffs in ${messages} messages, drawn in ${frames} frames`;
  const last = items.sort((a, b) => b.n - a.n).slice(0, 5);
  $("import-rows").replaceChildren(...last.map((row) => el("li", {}, `${row.name}${row.ok ? "" : " (rejected)"}`)));
}

// -- the buttons --------------------------------------------------------------------------------------------
for (const button of document.querySelectorAll("button[data-kind]")) {
  button.addEventListener("click", async () => {
    const kind = button.dataset.kind;
    try {
      const res = await fetch(`/demo/jobs/${kind}`, { method: "POST" });
      const body = await res.json().catch(() => ({}));
      if (res.status === 404 && body.error !== "unknown-job") {
        $("notice").textContent = "The buttons need the demo server: run `make demo`.";
      } else if (!res.ok) {
        $("notice").textContent = `Could not start the ${kind}: ${body.message || res.status}`;
      } else {
        $("notice").textContent = `Started ${kind} ${body.id.slice(0, 8)} on ${body.channel}`;
      }
    } catch (err) {
      $("notice").textContent = `Could not reach the sidecar: ${err.message}`;
    }
  });
}
