// Runs the API reference's JavaScript clients, unchanged, against a server; prints one
// `RESULT {json}` line for the Python test to check.
//   node run_reference_client.js http http://127.0.0.1:PORT   (WoollyClient, TypeScript)
//   node run_reference_client.js ws ws://127.0.0.1:PORT/ws    (WoollyWebSocket)
// Only each file's class definitions run: its "// Usage" tail targets localhost:11434
// with 200 tokens. Node 20 has no global WebSocket, so the `ws` package stands in.
'use strict';
const fs = require('fs');
const path = require('path');

const REFERENCE = path.join(__dirname, '..', 'reference_clients');

function definitions(file) {
  const source = fs.readFileSync(path.join(REFERENCE, file), 'utf8');
  return source.slice(0, source.indexOf('// Usage'));
}

function load(file, className) {
  let code = definitions(file);
  if (file.endsWith('.ts')) {
    const ts = require('typescript');
    code = ts.transpileModule(code, { compilerOptions: { target: ts.ScriptTarget.ES2022 } }).outputText;
  }
  return (0, eval)(`${code}\n${className}`);   // global scope, as a script would run it
}

function report(result) {
  console.log('RESULT ' + JSON.stringify(result));
}

async function httpScenario(baseUrl) {
  const WoollyClient = load('woolly_client.ts', 'WoollyClient');
  const client = new WoollyClient(baseUrl);
  const options = { maxTokens: 3, temperature: 0 };
  const text = await client.generate('Once upon a time', options);
  const tokens = [];
  for await (const token of client.generateStream('Once upon a time', options)) tokens.push(token);
  let error = null;
  try {
    await client.generate('Once upon a time', { maxTokens: -1 });
  } catch (e) {
    error = e.message;
  }
  report({ text, tokens, error });
}

async function wsScenario(url) {
  globalThis.WebSocket = require('ws');
  const WoollyWebSocket = load('woolly_websocket.js', 'WoollyWebSocket');
  const client = new WoollyWebSocket(url);
  const statuses = [];
  client.onStatus = (msg) => statuses.push(msg);
  await client.connect();

  const run = (prompt, config, cancelAfterFirstToken) => new Promise((resolve) => {
    const tokens = [];
    const id = client.generate(prompt, config, {
      onToken: (msg) => {
        tokens.push(msg);
        if (cancelAfterFirstToken && tokens.length === 1) client.cancel(id);
      },
      onComplete: (msg) => resolve({ id, tokens, complete: msg }),
      onError: (msg) => resolve({ id, tokens, error: msg }),
    });
  });

  const story = await run('Tell me a story', { max_tokens: 3, temperature: 0 }, false);
  await new Promise((r) => setTimeout(r, 5));   // the reference's ids are req-<ms>: keep them distinct
  const cancelled = await run('Count to one hundred:', { max_tokens: 200, temperature: 0 }, true);
  await new Promise((r) => setTimeout(r, 5));
  const invalid = await run('Hi', { max_tokens: -3 }, false);
  client.close();
  report({ statuses, story, cancelled, invalid });
}

const [mode, url] = process.argv.slice(2);
(mode === 'http' ? httpScenario(url) : wsScenario(url)).catch((e) => {
  console.error(e);
  process.exit(1);
});
