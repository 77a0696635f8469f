#!/usr/bin/env bash
# Vendors the chart page's browser dependencies into views/static/vendor/ (the repo's
# front-end "build command"; its output is committed, so running the worker needs no npm).
#
#   npm ci in frontend/ (exact versions of frontend/package-lock.json), then copies
#   lightweight-charts' ES-module standalone build, LICENSE and NOTICE, and writes the
#   provenance README.md. Idempotent: same lock file, same output.
#
# The npm tarball of lightweight-charts has no NOTICE file; the NOTICE the README asks
# for ("attribution notice from the NOTICE file") lives in the GitHub repository and is
# kept in frontend/lightweight-charts.NOTICE (copied verbatim from there, see its README).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
FRONT=$REPO/frontend
OUT=$REPO/views/static/vendor
PKG=lightweight-charts

cd "$FRONT"
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
version=$(node -p "require('./node_modules/$PKG/package.json').version")
# name, version, tarball URL and integrity as pinned by the lock file
read -r tarball integrity < <(node -e "
  const l = require('./package-lock.json').packages['node_modules/$PKG'];
  const url = l.resolved || 'https://registry.npmjs.org/$PKG/-/$PKG-' + l.version + '.tgz';
  console.log(url, l.integrity);")

mkdir -p "$OUT"
src=node_modules/$PKG
install -m 0644 "$src/dist/$PKG.standalone.production.mjs" "$OUT/"
install -m 0644 "$src/LICENSE" "$OUT/$PKG.LICENSE"
install -m 0644 "$FRONT/$PKG.NOTICE" "$OUT/$PKG.NOTICE"
# fancy-canvas (MIT, TradingView; its package ships no LICENSE file) is bundled inside
fancy=$(node -p "require('./node_modules/fancy-canvas/package.json').version")

# the date is the lock file's last change, so a re-run does not rewrite the README
stamp=$(git -C "$REPO" log -1 --format=%cs -- frontend/package-lock.json 2>/dev/null || true)
stamp=${stamp:-$(date -u -r "$FRONT/package-lock.json" +%F)}
cat > "$OUT/README.md" <<MD
# Vendored browser libraries

Written by \`scripts/vendor-frontend.sh\` from \`frontend/package-lock.json\`; do not edit.

| file | from |
|---|---|
| \`$PKG.standalone.production.mjs\` | \`dist/\` of the npm package |
| \`$PKG.LICENSE\` | \`LICENSE\` of the npm package (Apache-2.0) |
| \`$PKG.NOTICE\` | \`NOTICE\` of github.com/tradingview/lightweight-charts (the npm tarball has none) |

Provenance: npm package \`$PKG\` version $version, tarball $tarball,
integrity \`$integrity\`, vendored $stamp. The standalone build bundles its one
dependency, fancy-canvas $fancy (MIT, by TradingView; its package has no LICENSE file).

The NOTICE file is not in the npm tarball; it was copied verbatim from the
repository (commit 871d2dd42d989f41aeecbfb05f19b14e0d825fce, 2026-07-08; the file is
unchanged since 2025-01-28 and identical at tag v5.2.0). The package README asks for
its attribution notice and a link to <https://www.tradingview.com/> on the page:
\`views/static/index.html\` shows both in its footer, and the chart keeps the
\`attributionLogo\` option on.
MD
echo "vendor-frontend: $PKG $version -> ${OUT#"$REPO"/}"
