// The request in the code panel, as curl, Python `requests` (the hosted Queue API's example style) and the
// `openai` SDK. The key is never written out: every snippet reads AURASERVE_API_KEY.

function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

// JSON values as Python literals (JSON string escapes are valid Python string escapes).
function python(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    return `[${value.map((v) => python(v, inner)).join(", ")}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  const lines = entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${python(v, inner)},`);
  return `{\n${lines.join("\n")}\n${indent}}`;
}

export function curlSnippet(origin, submitPath, body) {
  return [
    `curl -X POST ${shellQuote(origin + submitPath)} \\`,
    `  -H 'Content-Type: application/json' \\`,
    `  -H "Ocp-Apim-Subscription-Key: $AURASERVE_API_KEY" \\`,
    `  -d ${shellQuote(JSON.stringify(body))}`,
  ].join("\n");
}

export function pythonSnippet(origin, submitPath, body) {
  return [
    "import os",
    "",
    "import requests",
    "",
    `url = ${JSON.stringify(origin + submitPath)}`,
    "headers = {",
    '    "Content-Type": "application/json",',
    '    "Cache-Control": "no-cache",',
    '    "Ocp-Apim-Subscription-Key": os.environ["AURASERVE_API_KEY"],',
    "}",
    `data = ${python(body)}`,
    "response = requests.post(url, json=data, headers=headers)",
    "print(response.json())",
  ].join("\n");
}

export function openaiSnippet(origin, modelId, body) {
  const extra = {};
  for (const name of ["negative_prompt", "seed", "guidance_scale", "output_format"]) {
    if (body[name] !== undefined && body[name] !== "") extra[name] = body[name];
  }
  if (body.output_format === "jpeg" || body.output_format === "webp") {
    extra.output_compression = body.output_quality;
  }
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    "client = OpenAI(",
    `    base_url=${JSON.stringify(`${origin}/v1`)},`,
    '    api_key=os.environ["AURASERVE_API_KEY"],',
    ")",
    "result = client.images.generate(",
    `    model=${JSON.stringify(modelId)},`,
    `    prompt=${JSON.stringify(body.prompt)},`,
    `    n=${body.num_images},`,
    `    size=${JSON.stringify(`${body.width}x${body.height}`)},`,
    `    extra_body=${python(extra, "    ")},`,
    ")",
    "# No steps, shift, sampler or scheduler in this dialect:",
    "# `quality` picks the steps, the preset the rest.",
    "print(result.data[0].url)",
  ].join("\n");
}
