#!/usr/bin/env bash
# Builds the Bolt interop peer once per version of its sources, into
# ~/.cache/atoll/bolt-java-<hash>/ (classes/ and classpath.txt), and prints
# that directory. CI's clone starts with an empty target/; the cache under
# the home directory is what makes the second run fast.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
hash="$(cat "$here/pom.xml" "$here"/src/main/java/dev/atoll/interop/*.java | sha256sum | cut -c1-12)"
out="${XDG_CACHE_HOME:-$HOME/.cache}/atoll/bolt-java-$hash"
if [[ -f "$out/classpath.txt" && -d "$out/classes" ]]; then
    echo "$out"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$here/pom.xml" "$here/src" "$work/"
(cd "$work" && mvn -q -B -o dependency:build-classpath -Dmdep.outputFile=classpath.txt >/dev/null 2>&1 \
    || mvn -q -B dependency:build-classpath -Dmdep.outputFile=classpath.txt >&2)
mkdir -p "$work/classes"
javac -d "$work/classes" -cp "$(cat "$work/classpath.txt")" "$work"/src/main/java/dev/atoll/interop/*.java >&2
mkdir -p "$(dirname "$out")"
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
cp -r "$work/classes" "$work/classpath.txt" "$out.tmp/"
mv "$out.tmp" "$out"
echo "$out"
