#!/usr/bin/env bash
# The install size of each role (docs/install.md): the wheel of this tree, installed with one
# extra into a fresh venv; prints the role and the size of site-packages without pip itself.
# Needs the package registry. Usage: bench/install_sizes.sh [python3]
set -euo pipefail
python=${1:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
mkdir "$work/src"
cp -r "$root"/{pyproject.toml,setup.py,README.md,models,edge_runtime,edge_wire,proxy,edge_client,edgectl} "$work/src/"
"$python" -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/edge_runtime-*.whl)
printf '%-26s %8s  %s\n' role MiB packages
for extra in "" sidecar controller engine "engine,sidecar" all otlp; do
    "$python" -m venv "$work/venv"
    "$work/venv/bin/pip" install -q --disable-pip-version-check "$wheel${extra:+[$extra]}"
    site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # pip and setuptools come with every venv; what the role adds is the rest
    kib=$(du -sk --exclude='pip' --exclude='pip-*' --exclude='setuptools*' --exclude='_distutils_hack' --exclude='pkg_resources' "$site" | cut -f1)
    count=$("$work/venv/bin/pip" list --format=freeze --disable-pip-version-check | grep -cv '^\(pip\|setuptools\)==')
    printf '%-26s %8.1f  %s\n' "edge-runtime${extra:+[$extra]}" "$(echo "$kib / 1024" | bc -l)" "$count"
    rm -rf "$work/venv"
done
