// Drives a real Chromium on one page for tests/tests/browser.rs, by JSON lines:
//   argv: --chromium PATH --url URL
//   out:  {"opened": true}
//   in:   {"eval": "JS EXPRESSION"}   out: {"value": ...} (or {"error": "..."})
//   in:   {"screenshot": "FILE.png"}  out: {"saved": "FILE.png"}
//   in:   {"close": true}              (or end of input)
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({ options: { chromium: { type: "string" }, url: { type: "string" } } });
const say = (value) => process.stdout.write(JSON.stringify(value) + "\n");

const browser = await chromium.launch({ executablePath: args.chromium, args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("console", (message) => process.stderr.write(`page: ${message.text()}\n`));
  page.on("pageerror", (error) => process.stderr.write(`page error: ${error}\n`));
  await page.goto(args.url);
  say({ opened: true });
  for await (const line of createInterface({ input: process.stdin })) {
    const command = JSON.parse(line);
    if (command.close) break;
    if (command.screenshot) {
      await page.screenshot({ path: command.screenshot, fullPage: true });
      say({ saved: command.screenshot });
      continue;
    }
    try {
      say({ value: await page.evaluate(command.eval) });
    } catch (error) {
      say({ error: String(error) });
    }
  }
} finally {
  await browser.close();
}
process.exit(0);
