// securechat's browser client: one module, no framework, no build step.
//
// It speaks the line protocol of every other client over a WebSocket at /ws: each text message the
// server sends is one line ("[bob] hi", "* carol joined", "@id=...;room=dev [bob] hi"), each line typed
// is one message. Everything received is inserted as text (textContent, createTextNode), never as HTML.
//
// Layout of this file:
//   1. the line protocol: parseLine() turns a line into a message {kind, room, id, ...} through the
//      KINDS table (add a kind there: a test and what it yields), and RENDER draws each kind;
//   2. rooms and their logs, the people list, mentions and notifications;
//   3. the connection: login (nickname, or a browser device from 'securechat invite NAME --web'),
//      flood pacing, /session and /resume after a dropped connection (a phone that slept), probes.

import * as files from "./files.js";

const $ = (id) => document.getElementById(id);

// -- 1. the line protocol ------------------------------------------------------------------------

const NICK_RE = /^[A-Za-z0-9_-]{1,24}$/;
const TAG_RE = /^@id=([0-9]{1,15}-[0-9]{1,15});room=([^ ;]{1,40}) /;
const REPLAY_RE = /^\((history|missed) ([0-9: -]{5,16})\) /;
const ROOM_RE = /^#([A-Za-z0-9_-]{1,32}) /;
const MAX_LINE_BYTES = 4096; // the server's bound (wire/protocol.py); longer lines would cut us off

// Each kind: a test on the line (after its tag, replay label and room prefix are taken off) and the
// fields it yields. The first that matches wins; "text" catches anything else.
export const KINDS = [
  ...files.FILE_KINDS, // "* alice shared NAME (SIZE): /get ID", and its private form (files.js)
  ["private", /^\[([A-Za-z0-9_-]{1,24}) -> ([A-Za-z0-9_-]{1,24})\] (.*)$/s, (m) => ({sender: m[1], target: m[2], text: m[3]})],
  ["action", /^\[([A-Za-z0-9_-]{1,24})\] \* (.*)$/s, (m) => ({sender: m[1], text: m[2]})],
  ["chat", /^\[([A-Za-z0-9_-]{1,24})\] (.*)$/s, (m) => ({sender: m[1], text: m[2]})],
  ["notice", /^\* (.*)$/s, (m) => ({text: m[1]})],
  ["text", /^(.*)$/s, (m) => ({text: m[1]})],
];

export function parseLine(line) {
  const msg = {raw: line, id: null, room: null, replay: null, elsewhere: false};
  let rest = line;
  let m = TAG_RE.exec(rest);
  if (m) { msg.id = m[1]; msg.room = m[2]; rest = rest.slice(m[0].length); }
  if ((m = REPLAY_RE.exec(rest))) { msg.replay = `${m[1]} ${m[2]}`; rest = rest.slice(m[0].length); }
  if ((m = ROOM_RE.exec(rest))) { msg.room = m[1]; msg.elsewhere = true; rest = rest.slice(m[0].length); }
  for (const [kind, test, fields] of KINDS) {
    const found = test.exec(rest);
    if (found) return Object.assign(msg, {kind}, fields(found));
  }
  return msg; // unreachable: "text" matches everything
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function nickColour(nick) {
  let h = 0;
  for (const ch of nick.toLowerCase()) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${h % 360} 55% 42%)`;
}

function nickSpan(nick) {
  const span = el("span", "nick", nick);
  span.style.color = nickColour(nick);
  return span;
}

// kind -> the parts of its row (after the time). Only text nodes: a line can never become markup.
export const RENDER = {
  chat: (m) => [nickSpan(m.sender), el("span", "text", m.text)],
  action: (m) => [el("span", "star", "* "), nickSpan(m.sender), el("span", "text", m.text)],
  private: (m) => [nickSpan(m.sender === state.nick ? `${m.sender} \u2192 ${m.target}` : m.sender),
                   el("span", "text", m.text)],
  notice: (m) => [el("span", "notice", m.text)],
  file: (m) => [nickSpan(m.sender), ...files.render(m, state.nick)],
  text: (m) => [el("span", "text", m.text)],
};

function hhmm(date = new Date()) {
  return date.toTimeString().slice(0, 5);
}

export function renderLine(msg) {
  const li = el("li", msg.kind);
  li.append(el("span", "time", msg.replay || hhmm()), ...RENDER[msg.kind](msg));
  if (msg.replay) li.classList.add("replayed");
  if (msg.sender && msg.sender === state.nick) li.classList.add("own");
  if (isMention(msg)) li.classList.add("mention");
  return li;
}

// -- 2. rooms, people, mentions --------------------------------------------------------------------

const state = {
  nick: "", // our nickname once welcomed
  current: "lobby", // the room we type into
  rooms: new Map(), // room key -> {name, log (an <ol>), unread, seen: Set of ids}
  token: "", // resume token (/session)
  positions: new Map(), // room key -> newest id seen
  phase: "login", // login, joining, live, reconnecting, ended
  paging: null, // lines of a /history page being collected, to go above the log
  whoWanted: 0, // /who answers to take for the people list instead of showing them
};
const MAX_ROWS = 2000; // per room: older rows leave the page (the server keeps history)
const MAX_SEEN = 5000;

const roomKey = (name) => name.replace(/^#/, "").toLowerCase();

function room(name) {
  const key = roomKey(name);
  let r = state.rooms.get(key);
  if (!r) {
    r = {name: name.replace(/^#/, ""), log: el("ol", "log"), unread: 0, seen: new Set()};
    r.log.hidden = true;
    $("logs").append(r.log);
    state.rooms.set(key, r);
    drawRooms();
  }
  return r;
}

function dropRoom(name) {
  const r = state.rooms.get(roomKey(name));
  if (!r) return;
  r.log.remove();
  state.rooms.delete(roomKey(name));
  state.positions.delete(roomKey(name));
  drawRooms();
}

function switchTo(name) {
  state.current = name.replace(/^#/, "");
  const r = room(state.current);
  r.unread = 0;
  for (const other of state.rooms.values()) other.log.hidden = other !== r;
  $("room-title").textContent = `#${r.name}`;
  drawRooms();
  scrollDown(true);
  askWho();
}

function drawRooms() {
  const list = $("rooms");
  list.replaceChildren();
  for (const r of state.rooms.values()) {
    const li = el("li", roomKey(r.name) === roomKey(state.current) ? "current" : "", `#${r.name}`);
    li.addEventListener("click", () => { closeSide(); if (roomKey(r.name) !== roomKey(state.current)) say(`/join ${r.name}`); });
    if (r.unread) li.append(el("span", "unread", String(r.unread)));
    if (state.rooms.size > 1) {
      const part = el("button", "part", "\u00d7");
      part.title = `Leave #${r.name}`;
      part.addEventListener("click", (e) => { e.stopPropagation(); say(`/part ${r.name}`); });
      li.append(part);
    }
    list.append(li);
  }
}

function drawPeople(nicks) {
  const list = $("people");
  list.replaceChildren(...nicks.map((n) => {
    const li = el("li", n === state.nick ? "me" : "");
    li.append(nickSpan(n));
    li.addEventListener("click", () => { $("input").value = `/msg ${n} `; $("input").focus(); closeSide(); });
    return li;
  }));
  $("people-count").textContent = `(${nicks.length})`;
}

let whoTimer = null;
function askWho() { // the people of the current room, at most every 2 s (flood control counts it)
  if (whoTimer || state.phase !== "live") return;
  whoTimer = setTimeout(() => { whoTimer = null; if (state.phase === "live") { state.whoWanted++; say("/who"); } }, 300);
}

function isMention(msg) {
  if (!state.nick || !msg.sender || msg.sender === state.nick) return false;
  if (msg.kind === "private") return msg.target === state.nick;
  const escaped = state.nick.replace(/[-]/g, "\\-");
  return new RegExp(`(^|[^A-Za-z0-9_-])${escaped}($|[^A-Za-z0-9_-])`, "i").test(msg.text || "");
}

function notify(msg) {
  if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") return;
  try {
    new Notification(msg.kind === "private" ? `${msg.sender} (private)` : `${msg.sender} in #${msg.room || state.current}`,
                     {body: msg.text, tag: "securechat-mention"});
  } catch { /* some phones only notify from a service worker: the highlight and the title stay */ }
}

let unseenMentions = 0;
function titleBadge() {
  document.title = unseenMentions ? `(${unseenMentions}) securechat` : "securechat";
}
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) { unseenMentions = 0; titleBadge(); probe(); }
});

function scrollDown(force) {
  const logs = $("logs");
  if (force || logs.scrollHeight - logs.scrollTop - logs.clientHeight < 80) logs.scrollTop = logs.scrollHeight;
}

// -- what arrives ---------------------------------------------------------------------------------

// Notices the client acts on (the same ones wire/resume.py and client/chat.py read).
const SESSION_RE = /^\* session ([A-Za-z0-9_-]{16,64}) ([0-9.]+)$/;
const CAP_RE = /^\* cap: (\w+) on; flood ([0-9.]+) lines\/s, burst ([0-9.]+)$/;
const JOINED_RE = /^\* you joined #([A-Za-z0-9_-]{1,32}) /;
const LEFT_RE = /^\* you left #([A-Za-z0-9_-]{1,32})$/;
const TALKING_RE = /^\* (?:.*; )?now talking in #([A-Za-z0-9_-]{1,32})$/;
const LIVE_RE = /^\* (?:.*; )?now live in #([A-Za-z0-9_-]{1,32})$/;
const WHO_RE = /^\* ([0-9]+) (?:online|in #[A-Za-z0-9_-]+): (.*)$/;
const WELCOME_RE = /^\* welcome, ([A-Za-z0-9_-]{1,24})! (\(resumed\) )?/;
const ONLINE_RE = / online: ([^.]*)\./; // the names, while there are few (else "N online (/who lists them)")
const DEVICE_RE = /^\* device: ([A-Za-z0-9_-]{1,24})$/;
const FINAL = [/^\* goodbye$/, /^\* disconnected for flooding$/, /^\* line too long/, /^\* no nickname within/,
               /^\* server full/, /^\* your certificate has been revoked/, /^\* this server requires a client certificate/,
               /^\* device refused: /, /^\* too many connections/];
const PEOPLE_CHANGE = /^[A-Za-z0-9_-]{1,24} (?:joined|left|is now )/;

function received(line) {
  lastHeard = Date.now();
  if (state.phase === "login" || state.phase === "joining") return beforeWelcome(line);
  if (state.phase === "reconnecting") return whileReconnecting(line);
  live(line);
}

function beforeWelcome(line) {
  let m;
  if ((m = DEVICE_RE.exec(line))) return deviceAccepted(m[1]);
  if ((m = WELCOME_RE.exec(line))) return welcomed(m[1], (ONLINE_RE.exec(line) || ["", ""])[1]);
  if (line.startsWith("* nickname refused: ")) return loginError(line.slice(20).replace(/; send another$/, ""));
  if (line.startsWith("* device refused: ")) return deviceRefused(line.slice(18));
  if (FINAL.some((re) => re.test(line))) { finalWord = line.slice(2); return loginError(line.slice(2)); }
}

// A refused device is forgotten unless the server only could not check it now; the person may then
// join as a guest where the server allows guests.
function deviceRefused(why) {
  finalWord = `device refused: ${why}`;
  if (!/right now/.test(why)) { store.set("device", ""); claim = ""; pendingSecret = ""; }
  $("nick").readOnly = false;
  $("login-who").hidden = true;
  loginError(`This browser was not let in: ${why}`);
}

function whileReconnecting(line) {
  let m;
  if ((m = DEVICE_RE.exec(line))) return sendLogin();
  if ((m = WELCOME_RE.exec(line))) {
    const resumed = Boolean(m[2]);
    state.phase = "live";
    setStatus("");
    say("/cap echo");
    if (!resumed) { // the server no longer knew us: a new session, back in our rooms
      say("/session");
      const current = state.current;
      for (const r of state.rooms.values()) if (roomKey(r.name) !== "lobby" && roomKey(r.name) !== roomKey(current)) say(`/join ${r.name}`);
      if (roomKey(current) !== "lobby") say(`/join ${current}`);
      show(parseLine("* reconnected; lines said while away may be missing (the server had forgotten this session)"));
    }
    return;
  }
  if (line.startsWith("* resume refused: ")) { state.token = ""; forgetSession(); return send(state.nick); }
  if (line.startsWith("* nickname refused: ")) { state.phase = "ended"; return backToLogin(line.slice(20)); }
  if (line.startsWith("* device refused: ")) { state.phase = "ended"; deviceRefused(line.slice(18)); return backToLogin($("login-error").textContent); }
  if (FINAL.some((re) => re.test(line))) { finalWord = line.slice(2); state.phase = "ended"; forgetSession(); return backToLogin(finalWord); }
}

function live(line) {
  let m;
  if (files.consume(line)) return; // the answer to a /ticket the page asked for a file
  if ((m = SESSION_RE.exec(line))) { state.token = m[1]; saveSession(); return; }
  if ((m = CAP_RE.exec(line))) { pacer.set(Number(m[2]), Number(m[3])); return; }
  if (state.whoWanted && (m = WHO_RE.exec(line))) {
    state.whoWanted--;
    return drawPeople(m[2].split(", ").filter((n) => NICK_RE.test(n)));
  }
  const msg = parseLine(line);
  if (msg.id) { // a room line: remember how far we are, show it once
    const key = roomKey(msg.room);
    const r = room(msg.room);
    if (r.seen.has(msg.id)) return;
    r.seen.add(msg.id);
    if (r.seen.size > MAX_SEEN) r.seen.delete(r.seen.values().next().value);
    const last = state.positions.get(key);
    if (!last || idNewer(msg.id, last)) state.positions.set(key, msg.id);
  }
  if (msg.kind === "notice") {
    if ((m = JOINED_RE.exec(line))) { room(m[1]); }
    if ((m = LEFT_RE.exec(line))) { dropRoom(m[1]); }
    if ((m = LIVE_RE.exec(line))) room(m[1]);
    if ((m = TALKING_RE.exec(line))) { switchTo(m[1]); saveSession(); }
    if (FINAL.some((re) => re.test(line))) { finalWord = line.slice(2); forgetSession(); }
    if (PEOPLE_CHANGE.test(msg.text) && !msg.elsewhere && !msg.replay) askWho();
  }
  if (state.paging && handlePage(msg)) return;
  show(msg);
}

function idNewer(a, b) {
  const [am, as] = a.split("-").map(Number);
  const [bm, bs] = b.split("-").map(Number);
  return am > bm || (am === bm && as > bs);
}

function show(msg) {
  const r = room(msg.room || state.current);
  const li = renderLine(msg);
  r.log.append(li);
  while (r.log.childElementCount > MAX_ROWS) r.log.firstElementChild.remove();
  const mention = li.classList.contains("mention") && !msg.replay;
  if (roomKey(r.name) !== roomKey(state.current)) {
    if (msg.kind !== "notice") { r.unread++; drawRooms(); }
  } else {
    scrollDown(msg.sender === state.nick);
  }
  if (mention) {
    notify(msg);
    if (document.hidden) { unseenMentions++; titleBadge(); }
  }
}

// /history: its lines go above what is shown, not below.
function handlePage(msg) {
  if (msg.kind === "notice" && /^end of history/.test(msg.text)) {
    const r = room(state.current);
    const rows = state.paging.map(renderLine);
    state.paging = null;
    r.log.prepend(...rows);
    return true;
  }
  if (msg.kind === "notice" && /^no earlier lines|^history is off/.test(msg.text)) { state.paging = null; return false; }
  if (msg.kind === "notice" && /^history of #/.test(msg.text)) return true;
  if (msg.replay) { state.paging.push(msg); return true; }
  return false;
}

// -- 3. the connection --------------------------------------------------------------------------------

const store = {
  get: (k) => { try { return localStorage.getItem(`securechat.${k}`) || ""; } catch { return ""; } },
  set: (k, v) => { try { if (v) localStorage.setItem(`securechat.${k}`, v); else localStorage.removeItem(`securechat.${k}`); } catch { /* private mode */ } },
};

// The resume token outlives a reload or a phone discarding the tab (sessionStorage is per tab): the
// page comes back as the same person, instead of finding its nick held for the dropped connection.
function saveSession() {
  try { sessionStorage.setItem("securechat.session", JSON.stringify({token: state.token, nick: state.nick, current: state.current})); } catch { /* private mode */ }
}
function forgetSession() { try { sessionStorage.removeItem("securechat.session"); } catch { /* private mode */ } }
function savedSession() {
  try { return JSON.parse(sessionStorage.getItem("securechat.session") || "null"); } catch { return null; }
}

let ws = null;
let lastHeard = 0;
let finalWord = "";
let retryDelay = 1000; // 1, 2, 4 ... 30 s, as the terminal client (wire/resume.py)
let retryTimer = null;
let claim = ""; // a --web invite token from the link, until the server took it
let pendingSecret = "";

// Flood pacing: the server drops lines past its limit (10 lines/s, bursts of 20, advertised in its
// answer to /cap echo); like the terminal client, we never send faster than that.
const pacer = {
  rate: 10, burst: 20, tokens: 20, last: performance.now(), queue: [], timer: null, showing: false,
  set(rate, burst) { this.rate = rate; this.burst = Math.max(1, burst); this.tokens = Math.min(this.tokens, this.burst); },
  push(text) { this.queue.push(text); this.pump(); },
  pump() {
    const now = performance.now();
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.rate);
    this.last = now;
    while (this.queue.length && (this.rate <= 0 || this.tokens >= 1)) {
      this.tokens -= 1;
      send(this.queue.shift());
    }
    if (this.queue.length && !this.timer) {
      this.timer = setTimeout(() => { this.timer = null; this.pump(); }, Math.max(20, 1000 / this.rate));
    }
    // Only its own "sending..." is cleared: the status line may hold something the person has not read
    // yet (a refusal), and this runs for lines the page sends by itself too (/who).
    if (this.queue.length) {
      setStatus(`sending\u2026 ${this.queue.length} to go`);
      this.showing = true;
    } else if (this.showing) {
      this.showing = false;
      if (state.phase === "live") setStatus("");
    }
  },
};

function send(text) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(text);
}

function say(text) { pacer.push(text); }

function connect() {
  clearTimeout(retryTimer);
  if (ws) { ws.onclose = null; ws.close(); }
  ws = new WebSocket(`wss://${location.host}/ws`);
  ws.onopen = () => { retryDelay = 1000; lastHeard = Date.now(); presentDevice() || sendLogin(); };
  ws.onmessage = (e) => { if (typeof e.data === "string") received(e.data); };
  ws.onclose = () => dropped();
}

function presentDevice() {
  const secret = store.get("device") || pendingSecret;
  if (!secret) return false;
  send(claim ? `/device ${secret} ${claim}` : `/device ${secret}`);
  return true;
}

function deviceAccepted(name) {
  if (claim) { store.set("device", pendingSecret); claim = ""; pendingSecret = ""; }
  store.set("name", name);
  $("nick").value = name;
  sendLogin();
}

function sendLogin() {
  if (state.phase === "reconnecting" && state.token) {
    const positions = [...state.positions].map(([key, id]) => `${state.rooms.get(key)?.name || key}=${id}`);
    send(`/resume ${state.token} ${positions.join(" ")}`.trim());
  } else {
    send(state.phase === "reconnecting" ? state.nick : $("nick").value.trim());
  }
}

function welcomed(nick, online) {
  state.nick = nick;
  state.phase = "live";
  store.set("nick", nick);
  $("login").hidden = true;
  $("chat").hidden = false;
  switchTo("lobby");
  drawPeople(online.split(", ").filter((n) => NICK_RE.test(n)));
  say("/cap echo");
  say("/session");
  showNotifyButton();
  $("input").focus();
}

function dropped() {
  ws = null;
  if (state.phase === "live" && !finalWord) {
    state.phase = "reconnecting";
  }
  if (state.phase === "reconnecting") {
    setStatus("connection lost: reconnecting\u2026", true);
    retryTimer = setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 30000);
    return;
  }
  if (state.phase === "live" || state.phase === "ended") {
    state.phase = "ended";
    const why = store.get("device") && /^your certificate has been revoked/.test(finalWord)
      ? "this browser's access has been revoked" : finalWord || "disconnected";
    setStatus(why, true);
    show(parseLine(`* ${why}; reload the page to join again`));
    return;
  }
  if (state.phase === "joining") { state.phase = "login"; loginError(finalWord || "the server closed the connection"); }
}

// A phone that slept may hold a socket that is dead without knowing it: on waking, or when the
// network comes back, ask the server something small; no answer within 4 s means reconnect now.
function probe() {
  if (state.phase === "reconnecting" && !ws) { connect(); return; }
  if (state.phase !== "live" || !ws) return;
  const asked = Date.now();
  send("/cap echo");
  setTimeout(() => { if (state.phase === "live" && ws && lastHeard < asked) ws.close(); }, 4000);
}
window.addEventListener("online", probe);

function setStatus(text, trouble = false) {
  $("status").textContent = text;
  $("status").classList.toggle("trouble", trouble);
}

function loginError(text) {
  $("login-error").textContent = text;
  if (state.phase === "joining" && !finalWord) state.phase = "joining"; // the server asks again: same socket
}

function backToLogin(text) {
  $("chat").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = text;
  if (ws) ws.close();
}

function join() {
  const nick = $("nick").value.trim();
  if (!store.get("device") && !pendingSecret && !NICK_RE.test(nick)) {
    $("login-error").textContent = "a nickname is 1-24 letters A-Z, digits, _ or -";
    return;
  }
  $("login-error").textContent = "";
  finalWord = "";
  if (state.phase === "joining" && ws && ws.readyState === WebSocket.OPEN) { sendLogin(); return; }
  state.phase = "joining";
  connect();
}

// -- typing -----------------------------------------------------------------------------------------

function submit() {
  const input = $("input");
  const text = input.value;
  if (!text.trim()) return;
  if (new TextEncoder().encode(text).length > MAX_LINE_BYTES) {
    show(parseLine(`* not sent: a line has at most ${MAX_LINE_BYTES} bytes`));
    return;
  }
  if (state.phase !== "live") { setStatus("not connected: wait a moment", true); return; }
  if (/^\/history\b/.test(text)) state.paging = [];
  if (!pacer.showing) setStatus(""); // the person has moved on: an outcome shown before (a refusal) goes
  say(text);
  input.value = "";
}

function showNotifyButton() {
  const button = $("notify");
  button.hidden = !("Notification" in window) || Notification.permission !== "default";
  button.onclick = () => Notification.requestPermission().then(() => { button.hidden = true; });
}

function closeSide() { $("chat").classList.remove("open"); $("menu").setAttribute("aria-expanded", "false"); }

// Leaving the page (closing the tab, reloading) leaves the chat at once: the nick is free again now, not
// after the grace period a dropped connection gets.
window.addEventListener("pagehide", (e) => {
  if (!e.persisted && state.phase === "live") { send("/quit"); forgetSession(); }
});

// A --web link opened in a tab that already shows the page changes only the fragment: start over with it.
window.addEventListener("hashchange", () => { if (/invite=/.test(location.hash)) location.reload(); });

function start() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("invite")) { // a --web link: this browser becomes that person's
    claim = hash.get("invite");
    const bytes = crypto.getRandomValues(new Uint8Array(32));
    pendingSecret = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    history.replaceState(null, "", location.pathname); // the token leaves the address bar and the history
  }
  const name = store.get("name");
  if (store.get("device") || claim) {
    $("nick").value = name;
    $("nick").readOnly = true;
    $("login-who").hidden = false;
    $("login-who").textContent = claim ? "This link makes this browser yours: press Enter to join."
      : `This browser belongs to ${name || "a registered person"}: press Enter to join.`;
  } else {
    $("nick").value = store.get("nick");
  }
  $("nick").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); join(); } });
  $("join").addEventListener("click", join);
  $("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.isComposing) { e.preventDefault(); submit(); } });
  $("send").addEventListener("click", () => { submit(); $("input").focus(); });
  $("earlier").addEventListener("click", () => { if (state.phase === "live") { state.paging = []; say("/history"); } });
  files.setup((line) => { say(line); return true; }, setStatus);
  files.wire({attach: $("attach"), picker: $("file-pick"), camera: $("camera"), cameraInput: $("camera-pick"),
              dropZone: $("logs"), target: () => `#${state.current}`});
  $("menu").addEventListener("click", () => {
    const open = $("chat").classList.toggle("open");
    $("menu").setAttribute("aria-expanded", String(open));
  });
  $("new-room").addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    const name = e.target.value.trim().replace(/^#/, "");
    if (/^[A-Za-z0-9_-]{1,32}$/.test(name)) { say(`/join ${name}`); e.target.value = ""; closeSide(); }
  });
  $("nick").focus();
  const saved = savedSession();
  if (saved && saved.token && NICK_RE.test(saved.nick || "") && (!claim)) { // this tab was here a moment ago
    state.nick = saved.nick;
    state.token = saved.token;
    state.current = saved.current || "lobby";
    state.phase = "reconnecting";
    $("login").hidden = true;
    $("chat").hidden = false;
    switchTo(state.current);
    showNotifyButton();
    setStatus("reconnecting\u2026");
    connect();
  }
}

start();
