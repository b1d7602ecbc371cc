#!/usr/bin/env bash
# Checks that libmshare/include/mshare.h is exactly what the pinned cbindgen generates
# from libmshare/src (config libmshare/cbindgen.toml).
#
#   scripts/check-header.sh           fail (exit 1, with a diff) when the header is stale
#   scripts/check-header.sh --update  rewrite the header
#
# cbindgen 0.29.4 is used from PATH when that is the version there, otherwise it is
# installed once with `cargo install --locked` into $CARGO_TARGET_DIR/tools (default
# target/tools), leaving any other cbindgen alone.
set -euo pipefail

want=0.29.4
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
crate=$repo/libmshare
header=$crate/include/mshare.h

update=0
case "${1-}" in
"") ;;
--update) update=1 ;;
*)
    echo "usage: $0 [--update]" >&2
    exit 2
    ;;
esac

if [ "$(cbindgen --version 2>/dev/null || true)" = "cbindgen $want" ]; then
    cbindgen=cbindgen
else
    root=${CARGO_TARGET_DIR:-$repo/target}/tools/cbindgen-$want
    cbindgen=$root/bin/cbindgen
    if [ ! -x "$cbindgen" ]; then
        echo "check-header: installing cbindgen $want into $root" >&2
        cargo install cbindgen --version "$want" --locked --root "$root" >&2
    fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$crate" && "$cbindgen" --config cbindgen.toml --crate libmshare \
    --output "$tmp/mshare.h" . 2>"$tmp/log"); then
    cat "$tmp/log" >&2
    echo "check-header: cbindgen failed" >&2
    exit 1
fi

if [ "$update" = 1 ]; then
    mkdir -p "$(dirname "$header")"
    cp "$tmp/mshare.h" "$header"
    echo "check-header: wrote $header"
    exit 0
fi

if ! diff -u "$header" "$tmp/mshare.h"; then
    echo "check-header: $header is stale; run scripts/check-header.sh --update" >&2
    exit 1
fi
echo "check-header: $header is up to date (cbindgen $want)"
