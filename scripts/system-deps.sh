#!/usr/bin/env bash
# Installs what the local control plane needs (etcd, Prometheus) and builds kube-apiserver 1.20.2 once
# from Debian's `kubernetes` source package, into ~/.cache/moeplace/bin/kube-apiserver.
#
# Idempotent: apt installs only missing packages, and the whole build (toolchain, source, compile) is
# skipped while the cached binary exists and answers --version. Runs without stdin (CI). Needs root or
# passwordless sudo for apt.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
CACHE_DIR="${MOEPLACE_CACHE_DIR:-$HOME/.cache/moeplace}"
BIN_DIR="$CACHE_DIR/bin"
BUILD_DIR="$CACHE_DIR/build"
APISERVER="$BIN_DIR/kube-apiserver"
# Debian packages 1.20.2 under this version string; the binary reports the upstream version.
KUBE_VERSION="v1.20.2"
RUNTIME_PACKAGES=(etcd-server prometheus openssl)
BUILD_PACKAGES=(golang-go rsync golang-github-modern-go-reflect2-dev)
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
DEB_SRC_LIST=/etc/apt/sources.list.d/moeplace-deb-src.sources
LOG_FILE="$CACHE_DIR/system-deps.log"

step() { printf 'system-deps: %s\n' "$*"; }
die() { printf 'system-deps: error: %s\n' "$*" >&2; exit 1; }

# Tools' own output goes to the log so the terminal shows one line per step; a failure shows its tail.
quietly() {
    mkdir -p "$CACHE_DIR"
    printf '\n$ %s\n' "$*" >>"$LOG_FILE"
    if ! "$@" >>"$LOG_FILE" 2>&1 </dev/null; then
        tail -n 40 "$LOG_FILE" >&2
        die "'$*' failed; full output in $LOG_FILE"
    fi
}

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot apt-get install"
    SUDO=(sudo -n)
fi

APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        step "apt-get update"
        quietly "${SUDO[@]}" apt-get update
        APT_UPDATED=1
    fi
}

# Installs only the packages that are not installed already, so a warm machine never touches apt.
apt_install_missing() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        step "packages present: $*"
        return
    fi
    apt_update_once
    step "apt-get install ${missing[*]}"
    # Without --no-install-recommends prometheus drags in node-exporter and friends as services.
    quietly "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}

apiserver_works() {
    [[ -x $APISERVER ]] && "$APISERVER" --version >/dev/null 2>&1
}

# The kubernetes source package is only on deb-src lines; mirror the deb sources rather than
# hard-coding a mirror, so snapshot pins and proxies configured on the machine still apply.
ensure_deb_src() {
    if grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        step "deb-src source present"
        return
    fi
    local origin=/etc/apt/sources.list.d/debian.sources
    [[ -f $origin ]] || die "$origin not found: add a deb-src line for bookworm by hand"
    step "adding deb-src source $DEB_SRC_LIST"
    sed -E 's/^Types:.*/Types: deb-src/' "$origin" | "${SUDO[@]}" tee "$DEB_SRC_LIST" >/dev/null
    APT_UPDATED=0
    apt_update_once
}

# Unpacks the upstream tree (with vendor/) once; the marker makes an interrupted run start over
# instead of building a half-extracted tree.
unpack_source() {
    local src="$BUILD_DIR/kubernetes"
    if [[ -f $src/.moeplace-unpacked ]]; then
        step "source tree present: $src"
        return
    fi
    rm -rf "$src"
    mkdir -p "$BUILD_DIR/download" "$src"
    local tarball
    tarball=$(find "$BUILD_DIR/download" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' | sort | head -n1)
    if [[ -z $tarball ]]; then
        step "apt-get source --download-only kubernetes"
        (cd "$BUILD_DIR/download" && quietly apt-get source --download-only kubernetes)
        tarball=$(find "$BUILD_DIR/download" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' | sort | head -n1)
    fi
    [[ -n $tarball ]] || die "no kubernetes_*.orig.tar.* in $BUILD_DIR/download"
    step "unpacking $(basename "$tarball")"
    tar -xf "$tarball" -C "$src" --strip-components=1
    [[ -f $src/Makefile && -d $src/vendor ]] || die "$tarball did not unpack to a tree with Makefile and vendor/"

    # Required: vendored reflect2 v1.0.1 panics under Go >= 1.18 (nil pointer in json-iterator's map
    # encoder on every custom-resource create); Debian's 1.0.2 is API-compatible.
    [[ -d $REFLECT2_SRC ]] || die "$REFLECT2_SRC missing: is golang-github-modern-go-reflect2-dev installed?"
    step "replacing vendor/github.com/modern-go/reflect2 with Debian's copy"
    local vendored="$src/vendor/github.com/modern-go/reflect2"
    rm -rf "$vendored"
    mkdir -p "$vendored"
    rsync -a --exclude='*_test.go' --exclude='tests/' "$REFLECT2_SRC/" "$vendored/"
    touch "$src/.moeplace-unpacked"
}

build_apiserver() {
    local src="$BUILD_DIR/kubernetes" jobs
    jobs=$(nproc 2>/dev/null || echo 2)
    mkdir -p "$src/.go/src/k8s.io" "$BUILD_DIR/home" "$BIN_DIR"
    ln -sfn ../../.. "$src/.go/src/k8s.io/kubernetes"
    # Without .git the build scripts would stamp v0.0.0-master; a version file gives clients the
    # real version (kubectl's skew check, discovery).
    cat >"$BUILD_DIR/version.env" <<EOF
KUBE_GIT_VERSION='$KUBE_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
KUBE_GIT_COMMIT='0000000000000000000000000000000000000000'
KUBE_GIT_TREE_STATE='clean'
EOF
    step "building kube-apiserver (${jobs} jobs, about 5 minutes on 2 cores; log: $LOG_FILE)"
    local started=$SECONDS
    (
        cd "$src"
        # HOME isolates the go build cache inside the build dir; -p caps compile parallelism to the
        # cores we have so the machine stays usable while it builds.
        quietly env GOPATH="$src/.go" CGO_ENABLED=0 GOFLAGS="-p=$jobs" HOME="$BUILD_DIR/home" \
            KUBE_GIT_VERSION_FILE="$BUILD_DIR/version.env" \
            make -j"$jobs" WHAT=cmd/kube-apiserver
    )
    local built="$src/_output/bin/kube-apiserver"
    [[ -x $built ]] || die "build finished but $built is missing"
    # Copy then rename so a concurrent reader never sees a partial binary.
    cp "$built" "$APISERVER.tmp"
    mv -f "$APISERVER.tmp" "$APISERVER"
    step "built $APISERVER in $((SECONDS - started))s: $("$APISERVER" --version)"
    # The 1.8 GB tree is only needed to build; the downloaded source stays for an offline rebuild.
    step "removing the build tree $src"
    rm -rf "$src"
}

main() {
    mkdir -p "$CACHE_DIR"
    # Two test runs starting at once on a fresh machine must not build into the same tree (nor race
    # on apt's lock): the second waits here, then finds the binary cached.
    exec 9>"$CACHE_DIR/system-deps.lock"
    if ! flock -n 9; then
        step "another system-deps.sh is running; waiting for it"
        flock 9
    fi
    apt_install_missing "${RUNTIME_PACKAGES[@]}"
    if apiserver_works; then
        step "kube-apiserver cached: $APISERVER ($("$APISERVER" --version))"
        return
    fi
    ensure_deb_src
    apt_install_missing "${BUILD_PACKAGES[@]}"
    unpack_source
    build_apiserver
}

main "$@"
