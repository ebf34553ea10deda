// The Probot side of bench/webhook_ingest.py: the smallest app that does what our webhook
// endpoint is compared against — Probot's own signature verification (@octokit/webhooks,
// HMAC-SHA256 over the raw body) and parsing `/cast <spell-id> [key=value ...]` lines out of a new
// issue comment. No GitHub API call, no storage. Run with `probot run ./index.js` (APP_ID,
// PRIVATE_KEY, WEBHOOK_SECRET, PORT, HOST from the environment).
//
// GET /bench/stats answers how many deliveries the handler saw and how many commands it parsed,
// so the benchmark can check that every accepted delivery really reached the handler.

const CAST_LINE = /^\/cast[ \t]+([A-Za-z0-9][A-Za-z0-9._-]*(?:@[0-9A-Za-z.+-]+)?)((?:[ \t]+\S+)*)[ \t]*$/gm;
const KEY_VALUE = /([A-Za-z_][A-Za-z0-9_.-]*)=("(?:[^"\\]|\\.)*"|\S+)/g;

export function parseCommands(body) {
  const commands = [];
  for (const m of body.matchAll(CAST_LINE)) {
    const input = {};
    for (const kv of (m[2] || "").matchAll(KEY_VALUE)) {
      const raw = kv[2];
      input[kv[1]] = raw.startsWith('"') ? JSON.parse(raw) : raw;
    }
    commands.push({ spell: m[1], input });
  }
  return commands;
}

const stats = { deliveries: 0, commands: 0, lastCommand: null };

export default (app, { addHandler } = {}) => {
  app.on("issue_comment.created", async (context) => {
    const comment = context.payload.comment;
    stats.deliveries += 1;
    const commands = parseCommands(String(comment.body || ""));
    stats.commands += commands.length;
    if (commands.length) stats.lastCommand = commands[0];
  });

  if (addHandler) {
    addHandler((req, res) => {
      if (req.method === "GET" && req.url === "/bench/stats") {
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify(stats));
        return true;
      }
      return false;
    });
  }
};
