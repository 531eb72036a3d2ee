// Files in the browser: attach, drag-and-drop and a phone's camera; images shown inline, other files as links.
//
// An upload runs on a WebSocket of its own at /files (so the chat's socket never waits behind a photo),
// speaking securechat-file/1's frames, the very protocol of the terminal client's file connection: a type
// byte ("C" control, JSON; "D" data), a 4-byte big-endian length, the payload. The SHA-256 is computed here
// chunk by chunk (sha256.js) and declared at the end; the server checks it before keeping anything. A
// dropped socket is resumed with the same ticket from the offset the server reports.
//
// Tickets come from the chat: "/ticket put TAG TARGET SIZE NAME" or "/ticket get TAG ID" is said on the
// chat's WebSocket, and the answer "* ticket TAG ok TOKEN" (or "... refused: WHY") is taken here, never
// shown. A download is a plain GET of /files/ID?t=TOKEN: images (PNG, JPEG, GIF, WebP, by their bytes)
// come back inline and are shown as thumbnails, anything else as an attachment behind a link.

import {Sha256} from "./sha256.js";

const CHUNK = 256 * 1024; // bytes per data frame, as the terminal client sends them
const WINDOW = 4 * 1024 * 1024; // bytes handed to the socket ahead of what it has sent
const RETRIES = 5;
const TICKET_WAIT = 10000; // ms
const ID = "[23456789abcdefghjkmnpqrstuvwxyz]{10}";
const IMAGE_NAME = /\.(jpe?g|png|gif|webp)$/i;
const TICKET_RE = /^\* ticket (f[0-9]+) (?:ok ([A-Za-z0-9_-]{16,64})|refused: (.*))$/s;

// What the chat lines announcing a file look like (see the KINDS table in app.js).
export const FILE_KINDS = [
  ["file", new RegExp(`^\\* ([A-Za-z0-9_-]{1,24}) shared (.+) \\(([^()]+)\\): /get (${ID})$`, "s"),
   (m) => ({sender: m[1], name: m[2], size: m[3], fileId: m[4]})],
  ["file", new RegExp(`^\\[([A-Za-z0-9_-]{1,24}) -> ([A-Za-z0-9_-]{1,24})\\] \\* shared (.+) \\(([^()]+)\\): /get (${ID})$`, "s"),
   (m) => ({sender: m[1], target: m[2], name: m[3], size: m[4], fileId: m[5]})],
];

let chatSend = () => false; // says a line on the chat (app.js gives its paced sender)
let status = () => {}; // shows progress and outcomes on the page's status line
let tags = 0;
const waiting = new Map(); // tag -> {resolve, reject, timer}

export function setup(sendLine, showStatus) {
  chatSend = sendLine;
  status = showStatus;
}

// A ticket answer for a question asked here: true (the line is not shown).
export function consume(line) {
  const m = TICKET_RE.exec(line);
  if (!m || !waiting.has(m[1])) return false;
  const {resolve, reject, timer} = waiting.get(m[1]);
  waiting.delete(m[1]);
  clearTimeout(timer);
  if (m[2]) resolve(m[2]); else reject(new Error(m[3]));
  return true;
}

function ticket(request) {
  const tag = `f${++tags}`;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { waiting.delete(tag); reject(new Error("the server did not answer")); }, TICKET_WAIT);
    waiting.set(tag, {resolve, reject, timer});
    chatSend(request(tag));
  });
}

// -- frames --------------------------------------------------------------------------------------------

const encoder = new TextEncoder();

function control(msg) {
  const body = encoder.encode(JSON.stringify(msg));
  const frame = new Uint8Array(5 + body.length);
  frame[0] = 0x43; // "C"
  new DataView(frame.buffer).setUint32(1, body.length);
  frame.set(body, 5);
  return frame;
}

// The control messages in what the server sent (it sends no file bytes to an uploader).
class Controls {
  constructor() { this.buf = new Uint8Array(0); }
  feed(data) {
    const joined = new Uint8Array(this.buf.length + data.byteLength);
    joined.set(this.buf);
    joined.set(new Uint8Array(data), this.buf.length);
    const out = [];
    let pos = 0;
    while (joined.length - pos >= 5) {
      const length = new DataView(joined.buffer, pos + 1, 4).getUint32(0);
      if (joined[pos] !== 0x43 || length > 8192) throw new Error("the server sent something else than a control message");
      if (joined.length - pos - 5 < length) break;
      out.push(JSON.parse(new TextDecoder().decode(joined.subarray(pos + 5, pos + 5 + length))));
      pos += 5 + length;
    }
    this.buf = joined.slice(pos);
    return out;
  }
}

// -- upload ----------------------------------------------------------------------------------------------

// A file's name as it may go in a chat line (the server cleans it for good: this only keeps the line one line).
const lineName = (name) => name.replace(/[\x00-\x1f\x7f]/g, "_").slice(0, 200) || "file";

// Share a File (from the attach button, a drop, or the camera) with the room typed into ("-") or a nick.
export async function send(file, target = "-") {
  const shown = lineName(file.name);
  try {
    const token = await ticket((tag) => `/ticket put ${tag} ${target} ${file.size} ${shown}`);
    for (let attempt = 0; ; attempt++) {
      try {
        await uploadOnce(file, token, shown);
        status("");
        return;
      } catch (err) {
        if (!err.dropped || attempt >= RETRIES) throw err;
        status(`sending ${shown}: connection lost, resuming\u2026`, true);
        await new Promise((r) => setTimeout(r, 1000 * 2 ** attempt));
      }
    }
  } catch (err) {
    status(`${shown} was not sent: ${err.message}`, true);
  }
}

function uploadOnce(file, token, shown) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`wss://${location.host}/files`);
    ws.binaryType = "arraybuffer";
    const controls = new Controls();
    let over = false;
    const fail = (message, dropped = false) => {
      if (over) return;
      over = true;
      ws.onclose = null;
      ws.close();
      reject(Object.assign(new Error(message), {dropped}));
    };
    ws.onopen = () => ws.send(control({op: "put", ticket: token}));
    ws.onclose = () => fail("the connection was lost", true);
    ws.onmessage = (e) => {
      let messages;
      try { messages = controls.feed(e.data); } catch (err) { return fail(err.message); }
      for (const msg of messages) {
        if (msg.error) return fail(msg.error, /^busy/.test(msg.error));
        if (msg.ok === "put") stream(ws, file, msg.offset, shown).catch((err) => fail(err.message, true));
        if (msg.ok === "done") { over = true; ws.onclose = null; resolve(msg.id); }
      }
    };
  });
}

async function stream(ws, file, offset, shown) {
  const hash = new Sha256();
  for (let pos = 0; pos < offset; pos += CHUNK) { // resuming: what the server has still counts in the hash
    hash.update(new Uint8Array(await file.slice(pos, Math.min(offset, pos + CHUNK)).arrayBuffer()));
  }
  const started = Date.now();
  for (let pos = offset; pos < file.size; pos += CHUNK) {
    const bytes = new Uint8Array(await file.slice(pos, pos + CHUNK).arrayBuffer());
    hash.update(bytes);
    const frame = new Uint8Array(5 + bytes.length);
    frame[0] = 0x44; // "D"
    new DataView(frame.buffer).setUint32(1, bytes.length);
    frame.set(bytes, 5);
    if (ws.readyState !== WebSocket.OPEN) throw new Error("the connection was lost");
    ws.send(frame);
    while (ws.bufferedAmount > WINDOW && ws.readyState === WebSocket.OPEN) await new Promise((r) => setTimeout(r, 20));
    const seconds = (Date.now() - started) / 1000;
    status(`sending ${shown}: ${Math.floor(100 * (pos + bytes.length) / file.size)}%` +
           (seconds > 0.5 ? `, ${size((pos + bytes.length - offset) / seconds)}/s` : ""));
  }
  ws.send(control({op: "end", sha256: hash.hex()}));
}

function size(n) {
  for (const [unit, scale] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
    if (n >= scale) return `${(n / scale).toFixed(n / scale < 10 ? 1 : 0)} ${unit}`;
  }
  return `${Math.round(n)} bytes`;
}

// -- what a shared file looks like in the log ---------------------------------------------------------

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The parts of a "file" row after the sender: its name as a link, its size, and for an image a
// thumbnail, fetched once the row is on screen (a ticket each: the history's images do not all load at once).
export function render(m, me) {
  const link = el("a", "file-name", m.name);
  link.href = "#";
  link.addEventListener("click", (e) => { e.preventDefault(); download(m.fileId); });
  const verb = !m.target ? "shared " : m.sender === me ? `sent ${m.target} ` : "sent you ";
  const parts = [el("span", "text", verb), link, el("span", "file-size", ` (${m.size})`)];
  if (IMAGE_NAME.test(m.name)) {
    const img = el("img", "thumb");
    img.alt = m.name;
    img.hidden = true; // until it has loaded (an image that is not one by its bytes never shows)
    img.dataset.fileId = m.fileId;
    img.addEventListener("click", () => download(m.fileId));
    thumbs.set(link, img);
    visible.observe(link); // the link has a box; the hidden picture has none to intersect
    parts.push(img);
  }
  return parts;
}

const thumbs = new WeakMap(); // a file's link -> its picture, waiting to be on screen
const visible = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    visible.unobserve(entry.target);
    showImage(thumbs.get(entry.target));
  }
});

async function showImage(img) {
  try {
    const token = await ticket((tag) => `/ticket get ${tag} ${img.dataset.fileId}`);
    img.onload = () => { img.hidden = false; };
    img.src = `/files/${img.dataset.fileId}?t=${token}`;
  } catch { /* no such file (expired, or not ours to see): the name stays, no picture */ }
}

async function download(fileId) {
  try {
    const token = await ticket((tag) => `/ticket get ${tag} ${fileId}`);
    const a = el("a");
    a.href = `/files/${fileId}?t=${token}&download=1`;
    a.download = "";
    document.body.append(a);
    a.click();
    a.remove();
  } catch (err) {
    status(`cannot fetch it: ${err.message}`, true);
  }
}

// -- picking files ----------------------------------------------------------------------------------------

// The attach button, the camera button (a phone opens its camera: accept=image/* capture), and dropping
// files anywhere on the chat.
export function wire({attach, picker, camera, cameraInput, dropZone, target}) {
  attach.addEventListener("click", () => picker.click());
  camera.addEventListener("click", () => cameraInput.click());
  for (const input of [picker, cameraInput]) {
    input.addEventListener("change", () => {
      for (const file of input.files) send(file, target());
      input.value = "";
    });
  }
  dropZone.addEventListener("dragover", (e) => { e.preventDefault(); dropZone.classList.add("dropping"); });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dropping"));
  dropZone.addEventListener("drop", (e) => {
    e.preventDefault();
    dropZone.classList.remove("dropping");
    for (const file of e.dataTransfer.files) send(file, target());
  });
}
