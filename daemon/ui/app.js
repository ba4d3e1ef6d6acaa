// The chat page and the models view. It talks only to the Ollama API the daemon serves
// (/api/tags, /api/show, /api/ps, /api/chat, /api/pull, /api/delete, /api/generate), so it
// works against Ollama too. Conversations stay in this browser's localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "hfollama.conversations";
const KEY = "hfollama.apiKey";

const state = {
  conversations: loadConversations(),
  current: null,        // the open conversation's id
  controller: null,     // the AbortController of the running request
  capabilities: {},     // model name -> capabilities from /api/show
  images: [],           // base64 images attached to the next message
};

// ---- the API --------------------------------------------------------------------------------

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = localStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(path, body, options = {}) {
  const response = await fetch(path, {method: body === undefined ? "GET" : (options.method || "POST"), headers: headers(),
                                      body: body === undefined ? undefined : JSON.stringify(body), signal: options.signal});
  if (response.status === 401) {
    $("key-bar").hidden = false;
    throw new Error("unauthorized: this daemon needs an API key");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    if (typeof message === "object") message = message.message || JSON.stringify(message);
    throw new Error(message);
  }
  return response;
}

// Calls onEvent for each NDJSON object of a streaming answer; an in-band {"error"} throws.
async function stream(path, body, onEvent, signal) {
  const response = await api(path, body, {signal});
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (!line) continue;
      const event = JSON.parse(line);
      if (event.error) throw new Error(event.error);
      onEvent(event);
    }
  }
  if (buffer.trim()) {
    const event = JSON.parse(buffer);
    if (event.error) throw new Error(event.error);
    onEvent(event);
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// ---- conversations --------------------------------------------------------------------------

function loadConversations() {
  try { return JSON.parse(localStorage.getItem(STORE)) || []; } catch (_) { return []; }
}

function save() {
  try { localStorage.setItem(STORE, JSON.stringify(state.conversations)); } catch (err) { setStatus(`not saved: ${err.message}`, true); }
}

function conversation() {
  let c = state.conversations.find((x) => x.id === state.current);
  if (!c) {
    c = {id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", model: $("model").value,
         system: "", options: {}, messages: []};
    state.conversations.unshift(c);
    state.current = c.id;
  }
  return c;
}

function openConversation(id) {
  state.current = id;
  const c = state.conversations.find((x) => x.id === id);
  if (c) {
    $("system").value = c.system || "";
    for (const name of ["temperature", "num_ctx", "seed", "num_predict"]) $(`opt-${name}`).value = c.options?.[name] ?? "";
    if (c.model && [...$("model").options].some((o) => o.value === c.model)) $("model").value = c.model;
  }
  renderConversations();
  renderMessages();
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of state.conversations) {
    const item = document.createElement("li");
    item.className = c.id === state.current ? "active" : "";
    const open = document.createElement("button");
    open.className = "link";
    open.textContent = c.title;
    open.onclick = () => openConversation(c.id);
    const remove = document.createElement("button");
    remove.className = "icon";
    remove.title = "Delete this chat";
    remove.textContent = "×";
    remove.onclick = () => {
      state.conversations = state.conversations.filter((x) => x.id !== c.id);
      if (state.current === c.id) state.current = null;
      save(); renderConversations(); renderMessages();
    };
    item.append(open, remove);
    list.append(item);
  }
}

function messageElement(message, index) {
  const box = document.createElement("div");
  box.className = `message ${message.role}`;
  box.dataset.index = index;
  if (message.thinking) {
    const details = document.createElement("details");
    details.className = "thinking";
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const body = document.createElement("div");
    body.textContent = message.thinking;
    details.append(summary, body);
    box.append(details);
  }
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "assistant") content.innerHTML = Markdown.render(message.content || "");
  else content.textContent = message.content;
  box.append(content);
  for (const image of message.images || []) {
    const img = document.createElement("img");
    img.src = `data:image/*;base64,${image}`;
    img.className = "attachment";
    box.append(img);
  }
  if (message.error) {
    const error = document.createElement("div");
    error.className = "error";
    error.textContent = message.error;
    box.append(error);
  }
  if (message.role === "user") {
    const edit = document.createElement("button");
    edit.className = "link edit";
    edit.textContent = "Edit";
    edit.onclick = () => editMessage(index);
    box.append(edit);
  }
  return box;
}

function renderMessages() {
  const c = state.conversations.find((x) => x.id === state.current);
  const messages = $("messages");
  messages.replaceChildren(...(c ? c.messages.map(messageElement) : []));
  messages.scrollTop = messages.scrollHeight;
}

function editMessage(index) {
  if (state.controller) return;
  const c = conversation();
  const [message] = c.messages.splice(index);  // this message and everything after it
  $("prompt").value = message.content;
  state.images = message.images || [];
  showAttachments();
  save(); renderMessages();
  $("prompt").focus();
}

// ---- chatting -------------------------------------------------------------------------------

function readOptions() {
  const options = {};
  for (const name of ["temperature", "num_ctx", "seed", "num_predict"]) {
    const text = $(`opt-${name}`).value.trim();
    if (text !== "") options[name] = Number(text);
  }
  return options;
}

async function send(text) {
  const c = conversation();
  c.model = $("model").value;
  c.system = $("system").value;
  c.options = readOptions();
  if (text !== null) {
    const message = {role: "user", content: text};
    if (state.images.length) message.images = state.images;
    c.messages.push(message);
    if (c.title === "New chat") c.title = text.slice(0, 40) || "New chat";
    state.images = [];
    showAttachments();
  }
  if (!c.model) { setStatus("no model: pull one in the Models view", true); return; }
  const reply = {role: "assistant", content: "", thinking: ""};
  c.messages.push(reply);
  save(); renderConversations(); renderMessages();
  const element = $("messages").lastElementChild;
  const history = c.messages.slice(0, -1).filter((m) => !m.error).map(({role, content, images}) => (images ? {role, content, images} : {role, content}));
  if (c.system.trim()) history.unshift({role: "system", content: c.system});
  const body = {model: c.model, messages: history, stream: true, options: c.options};
  if (thinks(c.model)) body.think = $("opt-think").checked;
  state.controller = new AbortController();
  busy(true);
  let frame = 0;
  const paint = () => {
    frame = 0;
    const fresh = messageElement(reply, c.messages.length - 1);
    element.replaceChildren(...fresh.childNodes);
    $("messages").scrollTop = $("messages").scrollHeight;
  };
  try {
    await stream("/api/chat", body, (event) => {
      if (event.message) {
        reply.content += event.message.content || "";
        reply.thinking += event.message.thinking || "";
      }
      if (event.done) {
        const rate = event.eval_duration ? (event.eval_count / (event.eval_duration / 1e9)).toFixed(1) : "?";
        setStatus(`${event.eval_count} tokens, ${rate} tokens/s`);
      }
      if (!frame) frame = requestAnimationFrame(paint);
    }, state.controller.signal);
  } catch (err) {
    if (err.name === "AbortError") setStatus("stopped");
    else { reply.error = err.message; setStatus(err.message, true); }
  } finally {
    state.controller = null;
    busy(false);
    if (!reply.thinking) delete reply.thinking;
    save();
    paint();
  }
}

function busy(running) {
  $("stop").hidden = !running;
  $("send").disabled = running;
  $("regenerate").disabled = running;
  document.body.classList.toggle("generating", running);
}

function thinks(model) { return (state.capabilities[model] || []).includes("thinking"); }

async function modelChanged() {
  const model = $("model").value;
  if (model && !state.capabilities[model]) {
    try {
      state.capabilities[model] = (await (await api("/api/show", {model})).json()).capabilities || [];
    } catch (err) { state.capabilities[model] = []; }
  }
  $("think-label").hidden = !thinks(model);
  $("attach-label").hidden = !(state.capabilities[model] || []).includes("vision");
}

function showAttachments() {
  $("attachments").textContent = state.images.length ? `${state.images.length} image(s) attached` : "";
}

// ---- models ---------------------------------------------------------------------------------

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1000)));
  return `${(n / 1000 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.append(td); return td; }

function button(label, onclick, title) {
  const b = document.createElement("button");
  b.textContent = label;
  if (title) b.title = title;
  b.onclick = onclick;
  return b;
}

async function refreshModels() {
  try {
    const tags = (await (await api("/api/tags")).json()).models || [];
    const select = $("model");
    const chosen = select.value || state.conversations.find((x) => x.id === state.current)?.model;
    select.replaceChildren(...tags.map((m) => new Option(m.name, m.name)));
    if (chosen && tags.some((m) => m.name === chosen)) select.value = chosen;
    const installed = $("installed").tBodies[0];
    installed.replaceChildren();
    for (const m of tags) {
      const row = installed.insertRow();
      row.dataset.model = m.name;
      cell(row, m.name); cell(row, bytes(m.size)); cell(row, m.details?.quantization_level || "");
      cell(row, m.details?.family || ""); cell(row, m.details?.parameter_size || "");
      cell(row, "").append(button("Delete", () => deleteModel(m.name), "Delete it from disk"));
    }
    const ps = (await (await api("/api/ps")).json()).models || [];
    const loaded = $("loaded").tBodies[0];
    loaded.replaceChildren();
    for (const m of ps) {
      const row = loaded.insertRow();
      row.dataset.model = m.name;
      cell(row, m.name); cell(row, bytes(m.size));
      cell(row, m.size_vram ? `${Math.round(100 * m.size_vram / m.size)}%` : "CPU");
      cell(row, m.context_length || "");
      cell(row, m.expires_at ? new Date(m.expires_at).toLocaleTimeString() : "");
      cell(row, "").append(button("Unload", () => unload(m.name), "Free its memory now"));
    }
    if (!ps.length) { const row = loaded.insertRow(); row.className = "empty"; cell(row, "nothing loaded").colSpan = 6; }
    await modelChanged();
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function unload(name) {
  try {
    await api("/api/generate", {model: name, keep_alive: 0});
    setStatus(`${name} unloaded`);
  } catch (err) { setStatus(err.message, true); }
  refreshModels();
}

async function deleteModel(name) {
  if (!confirm(`Delete ${name} from disk?`)) return;
  try {
    await api("/api/delete", {model: name}, {method: "DELETE"});
    setStatus(`${name} deleted`);
  } catch (err) { setStatus(err.message, true); }
  refreshModels();
}

async function pull(name) {
  const bar = $("pull-progress");
  const status = $("pull-status");
  status.classList.remove("error");
  bar.hidden = false;
  bar.value = 0;
  $("pull-start").disabled = true;
  const files = {};  // digest -> [completed, total]
  try {
    await stream("/api/pull", {model: name, stream: true}, (event) => {
      if (event.digest && event.total) files[event.digest] = [event.completed || 0, event.total];
      const done = Object.values(files).reduce((a, [c]) => a + c, 0);
      const total = Object.values(files).reduce((a, [, t]) => a + t, 0);
      if (total) { bar.max = total; bar.value = done; }
      status.textContent = total ? `${event.status}: ${bytes(done)} of ${bytes(total)}` : event.status;
    });
    status.textContent = `${name}: success`;
    bar.value = bar.max;
  } catch (err) {
    status.textContent = err.message;
    status.classList.add("error");
  } finally {
    $("pull-start").disabled = false;
    refreshModels();
  }
}

// ---- wiring ---------------------------------------------------------------------------------

function show(view) {
  for (const name of ["chat", "models"]) {
    $(`view-${name}`).hidden = name !== view;
    $(`tab-${name}`).classList.toggle("active", name === view);
  }
  if (view === "models") refreshModels();
}

document.querySelectorAll(".tab").forEach((tab) => { tab.onclick = () => show(tab.dataset.view); });
$("composer").onsubmit = (e) => {
  e.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  $("prompt").value = "";
  send(text);
};
$("prompt").onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
};
$("stop").onclick = () => state.controller?.abort();
$("regenerate").onclick = () => {
  const c = state.conversations.find((x) => x.id === state.current);
  if (!c || state.controller || !c.messages.length) return;
  if (c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
  send(null);
};
$("new-chat").onclick = () => { state.current = null; conversation(); save(); openConversation(state.current); };
$("model").onchange = modelChanged;
$("attach").onchange = async (e) => {
  for (const file of e.target.files) {
    const data = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    state.images.push(data);
  }
  e.target.value = "";
  showAttachments();
};
$("pull-form").onsubmit = (e) => { e.preventDefault(); const name = $("pull-name").value.trim(); if (name) pull(name); };
$("key-save").onclick = () => {
  localStorage.setItem(KEY, $("key-input").value.trim());
  $("key-bar").hidden = true;
  setStatus("");
  refreshModels();
};

if (state.conversations.length) state.current = state.conversations[0].id;
refreshModels().then(() => openConversation(state.current));
