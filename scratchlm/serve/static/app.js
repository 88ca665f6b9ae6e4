// The chat page: multi-turn chat over /v1/chat/completions, streamed as server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], model: null, context: null, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    state.model = body.data[0].id;
    state.context = body.data[0].max_model_len || null;
    $("model").textContent = "model: " + state.model +
      (state.context ? " (context " + state.context + " tokens)" : "");
  } catch (err) {
    $("model").textContent = "no model: " + err.message;
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Reads "data: ..." lines of a server-sent event stream and calls onData with each payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

function withSystem(system) {
  return system ? [{ role: "system", content: system }, ...state.messages] : state.messages;
}

async function countTokens(messages) {
  const response = await fetch("/tokenize", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: state.model, messages: messages, add_generation_prompt: true }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body.count;
}

// As `scratchlm chat` does: keep room for an answer of min(max tokens, half the context), dropping
// the oldest exchanges while the conversation does not leave it (the system prompt stays); then
// ask for as many tokens as fit. Returns the messages, max_tokens and how many messages went.
async function fitToContext(system, wanted) {
  if (!state.context) return { messages: withSystem(system), maxTokens: wanted, dropped: 0 };
  const reserve = Math.min(wanted, Math.floor(state.context / 2));
  let dropped = 0;
  let count = await countTokens(withSystem(system));
  while (count + reserve > state.context && state.messages.length > 1) {
    const cut = state.messages.length > 2 && state.messages[1].role === "assistant" ? 2 : 1;
    state.messages.splice(0, cut);
    dropped += cut;
    count = await countTokens(withSystem(system));
  }
  if (count >= state.context) {
    throw new Error("the conversation needs " + count + " tokens; the model's context is " +
      state.context);
  }
  const maxTokens = Math.min(wanted, state.context - count);
  return { messages: withSystem(system), maxTokens: maxTokens, dropped: dropped };
}

async function send(text) {
  if (!state.model) await loadModel();
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const system = $("system").value.trim();
  state.controller = new AbortController();
  setBusy(true);
  let answer = "";
  let finish = null;
  try {
    const wanted = Math.max(1, parseInt($("max-tokens").value, 10) || 1);
    const fitted = await fitToContext(system, wanted);
    if (fitted.dropped) {
      const note = document.createElement("div");
      note.className = "note dropped";
      note.textContent = "(" + fitted.dropped + " older message" + (fitted.dropped > 1 ? "s" : "") +
        " left out to fit the model's context of " + state.context + " tokens)";
      $("log").insertBefore(note, bubble.previousElementSibling);
    }
    const request = {
      model: state.model,
      messages: fitted.messages,
      stream: true,
      temperature: parseFloat($("temperature").value),
      max_tokens: fitted.maxTokens,
    };
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          bubble.textContent = answer;
          $("log").scrollTop = $("log").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    bubble.dataset.finish = finish || "";
  } catch (err) {
    if (err.name === "AbortError") {
      bubble.dataset.finish = "stopped";
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = "(stopped)";
      bubble.appendChild(note);
    } else {
      bubble.className = "msg error";
      bubble.textContent = "error: " + err.message;
      bubble.dataset.finish = "error";
      state.messages.pop(); // the turn did not happen: the message can be sent again
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (bubble.dataset.finish !== "error") state.messages.push({ role: "assistant", content: answer });
  bubble.classList.add("done");
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("reset").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("log").textContent = "";
});
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = $("temperature").value;
});
$("api-key").addEventListener("change", loadModel);
if (window.matchMedia("(max-width: 700px)").matches) $("settings").open = false;
loadModel();
