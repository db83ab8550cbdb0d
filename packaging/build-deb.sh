#!/usr/bin/env bash
# Build the meterd Debian package: packaging/build-deb.sh [OUTDIR]   (or: make deb)
#
# The package carries a self-contained virtual environment in /opt/meterd made with
# Debian's own Python (python3.X from the archive, not a pyenv or a hand-built one),
# so it depends on that package and keeps working when the build host is gone.
# The bundled environment is tied to that minor version (its extension modules are
# built for it): Depends: python3.X. Build on the Debian release you deploy to.
#
# Needs: dpkg-deb and dpkg-shlibdeps (dpkg-dev), binutils, python3.X with venv
# (python3-venv), and network access to PyPI for the dependencies.
#
# Environment: METERD_PYTHON (default /usr/bin/python3), DEB_REVISION (default 1),
# DEBFULLNAME/DEBEMAIL (the Maintainer field), SOURCE_DATE_EPOCH (default: the
# last commit's time).
set -euo pipefail
umask 022

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
out=$(mkdir -p "${1:-$top/dist}" && cd "${1:-$top/dist}" && pwd)
python=${METERD_PYTHON:-/usr/bin/python3}
maintainer="${DEBFULLNAME:-meterd maintainers} <${DEBEMAIL:-maintainers@meterd.invalid}>"

die() { echo "build-deb: $*" >&2; exit 1; }

for tool in dpkg-deb dpkg-shlibdeps strip gzip md5sum; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpkg-dev binutils)"
done
[ -x "$python" ] || die "$python is missing (apt-get install python3 python3-venv)"
python=$(readlink -f "$python")
dpkg -S "$python" >/dev/null 2>&1 || die "$python does not come from a Debian package;" \
    "the package must depend on an interpreter that dpkg knows"
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is Python $pyver; meterd needs 3.11 or later"
"$python" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$python cannot make virtual environments (apt-get install python3-venv)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/debian"
root=$work/debian/meterd
venv=$root/opt/meterd
site=opt/meterd/lib/python$pyver/site-packages

echo "build-deb: virtual environment with $python (Python $pyver)"
tar -C "$top" --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml agent collector \
    common $(cd "$top" && ls README.md LICENSE 2>/dev/null) | tar -C "$work/src" -xf -
"$python" -m venv "$venv"
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
"$venv/bin/python" -m pip install --quiet --no-compile "$work/src"
"$venv/bin/python" -m pip uninstall --quiet --yes pip setuptools

# Make the environment live at /opt/meterd rather than in this build folder.
find "$venv/bin" -mindepth 1 ! -name meterd ! -name 'python*' -delete
sed -i "1s|^#!.*|#!/opt/meterd/bin/python$pyver|" "$venv/bin/meterd"
ln -sfn "/usr/bin/python$pyver" "$venv/bin/python3"
sed -i '/^command = /d' "$venv/pyvenv.cfg"
rm -f "$root/$site"/meterd-*.dist-info/direct_url.json
find "$venv" -depth -type d -name __pycache__ -exec rm -rf {} +
if grep -rlF "$work" "$root" >/dev/null; then
    die "build paths left in the package: $(grep -rlF "$work" "$root" | head -3)"
fi
find "$venv" -type f -name '*.so*' -exec strip --strip-unneeded \
    --remove-section=.comment --remove-section=.note {} +
"$venv/bin/python" -I -m compileall -q "$venv/lib" >/dev/null \
    || die "a bundled module does not compile with Python $pyver"
find "$venv" -depth -type d -name __pycache__ -exec rm -rf {} +
rm -rf "$venv/include"
find "$venv/lib" -type f -exec chmod 0644 {} +
# Bundled modules are imported, never run: blank their "#!" lines (keeping line
# numbers for tracebacks) so none claims to be a script with an odd interpreter.
find "$venv/lib" -type f -name '*.py' -exec sed -i '1s/^#!.*$//' {} +

gen() { "$venv/bin/python" -I -B "$here/generate.py" "$@"; }
version=$("$venv/bin/python" -I -B -c 'import importlib.metadata as m; print(m.version("meterd"))')
debversion="$version-${DEB_REVISION:-1}"
arch=$(dpkg --print-architecture)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct 2>/dev/null \
    || date +%s)}
echo "build-deb: meterd $debversion ($arch)"

install -d "$root/etc/meterd" "$root/lib/systemd/system" "$root/usr/bin" \
    "$root/usr/share/man/man1" "$root/usr/share/doc/meterd" \
    "$root/usr/share/lintian/overrides" "$root/DEBIAN"
gen conffile agent >"$root/etc/meterd/agent.toml"
gen conffile collector >"$root/etc/meterd/collector.toml"
install -m 0644 "$top/systemd/meterd-agent.service" "$top/systemd/meterd-collector.service" \
    "$root/lib/systemd/system/"
ln -s /opt/meterd/bin/meterd "$root/usr/bin/meterd"
gen manpage "$version" "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)" \
    | gzip -9n >"$root/usr/share/man/man1/meterd.1.gz"
gen copyright "$site" >"$root/usr/share/doc/meterd/copyright"
install -m 0644 "$top/README.md" "$root/usr/share/doc/meterd/README.md"
cat <<EOF | gzip -9n >"$root/usr/share/doc/meterd/changelog.Debian.gz"
meterd ($debversion) unstable; urgency=medium

  * meterd $version with its Python dependencies in /opt/meterd.

 -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF
sed "s/@PYVER@/$pyver/g" "$here/debian/lintian-overrides" >"$root/usr/share/lintian/overrides/meterd"
install -m 0644 "$here/debian/conffiles" "$root/DEBIAN/conffiles"
install -m 0755 "$here/debian/postinst" "$here/debian/prerm" "$here/debian/postrm" \
    "$root/DEBIAN/"

# Permissions as dh_fixperms leaves them: no group or world writes, shared objects
# and data not executable.
find "$root" -path "$root/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
find "$root" -path "$root/DEBIAN" -prune -o -type f -perm /111 ! -name '*.so*' \
    -exec chmod 0755 {} +
find "$root" -path "$root/DEBIAN" -prune -o -type f \( -name '*.so*' -o ! -perm /111 \) \
    -exec chmod 0644 {} +

printf 'Source: meterd\n\nPackage: meterd\nArchitecture: any\n' >"$work/debian/control"
mapfile -t objects < <(find "$venv" -type f -name '*.so*' | sort)
(cd "$work" && dpkg-shlibdeps -O "${objects[@]/#/-e}" 2>"$work/shlibdeps.log") \
    >"$work/shlibs" || { cat "$work/shlibdeps.log" >&2; die "dpkg-shlibdeps failed"; }
shlibs=$(sed -n 's/^shlibs:Depends=//p' "$work/shlibs")

# dpkg keeps the checksums of conffiles itself, so md5sums lists the other files.
(cd "$root" && find . \( -path ./DEBIAN -o -path ./etc \) -prune -o -type f -printf '%P\0' \
    | LC_ALL=C sort -z | xargs -0 md5sum >DEBIAN/md5sums)
size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: meterd
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: python$pyver, adduser, init-system-helpers (>= 1.54~)${shlibs:+, $shlibs}
Section: admin
Priority: optional
Description: usage metering and billing for server-rental providers
 An agent on every metered host samples CPU, memory, disk, network and cgroup
 usage, keeps it in a durable local spool and ships it over mutual TLS to a
 central collector. The collector rates usage against tariffs and posts it to
 a double-entry ledger, and serves usage, balances and invoices over a REST API.
 .
 This package holds both daemons, their systemd units (meterd-agent.service,
 meterd-collector.service; neither enabled on install) and the meterd command,
 with its Python dependencies in a private environment under /opt/meterd.
EOF

deb="$out/meterd_${debversion}_$arch.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "build-deb: $deb"
