// Talking to the auraserve API from the page. The key travels only in a request header: never
// in a URL (EventSource cannot send headers, so the live status stream is read with fetch).

const KEY_STORAGE = "auraserve.apiKey";
const KEY_HEADER = "Ocp-Apim-Subscription-Key";

export const keyStore = {
  get() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  },
  set(value) {
    sessionStorage.setItem(KEY_STORAGE, value);
  },
  clear() {
    sessionStorage.removeItem(KEY_STORAGE);
  },
};

export class ApiError extends Error {
  constructor(status, body, message) {
    super(message);
    this.status = status;
    this.body = body;
    // The body's `field` names the parameter at fault (queue dialect error shape).
    this.field = body && typeof body.field === "string" ? body.field : null;
  }

  get unreachable() {
    return this.status === 0;
  }
}

const UNREACHABLE =
  "The server cannot be reached. Check that auraserve is running, then try again.";

function headers(extra) {
  const result = { Accept: "application/json", ...extra };
  const key = keyStore.get();
  if (key) result[KEY_HEADER] = key;
  return result;
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const init = {
    method,
    headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    credentials: "omit",
    cache: "no-store",
  };
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error && error.name === "AbortError") throw error;
    throw new ApiError(0, null, UNREACHABLE);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data && typeof data.message === "string" ? data.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, data, message);
  }
  return data;
}

// Yields each status object of GET /v2/requests/status/{id}/stream until the stream ends.
// With `onPreview`, the stream also asks for live previews and hands each `preview` event's
// body ({step, total_steps, images: [data URLs]}) to it.
export async function* statusStream(requestId, signal, onPreview = null) {
  const query = onPreview ? "?previews=true" : "";
  const path = `/v2/requests/status/${encodeURIComponent(requestId)}/stream${query}`;
  let response;
  try {
    response = await fetch(path, {
      headers: headers({ Accept: "text/event-stream" }),
      signal,
      credentials: "omit",
      cache: "no-store",
    });
  } catch (error) {
    if (error && error.name === "AbortError") return;
    throw new ApiError(0, null, UNREACHABLE);
  }
  if (!response.ok || !response.body) {
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    throw new ApiError(response.status, data, (data && data.message) || `HTTP ${response.status}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const lines = event.split("\n");
        const data = lines
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (lines.includes("event: preview")) {
          if (onPreview) onPreview(JSON.parse(data));
          continue;
        }
        yield JSON.parse(data);
      }
    }
  } catch (error) {
    if (error && error.name === "AbortError") return;
    throw new ApiError(0, null, UNREACHABLE);
  } finally {
    reader.releaseLock();
  }
}
