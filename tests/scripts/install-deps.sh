#!/usr/bin/env bash
# Installs what the end-to-end tests of hapair drive: FUSE, network namespaces,
# and independently written filesystem test suites. Idempotent: it installs
# only what is missing, and runs apt-get update at most once per invocation.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: must run as root (apt-get install, FUSE, netns)" >&2
    exit 2
fi

# --runtime: only what hapair itself (and its demo) needs at run time.
RUNTIME_ONLY=0
[ "${1:-}" = "--runtime" ] && RUNTIME_ONLY=1

# Debian package -> a binary that proves it is installed.
declare -A APT_BIN=(
    [fuse3]=fusermount3
    [iproute2]=ip
    [fio]=fio
    [stress-ng]=stress-ng
    [dbench]=dbench
    [acl]=setfacl
    [attr]=getfattr
    [psmisc]=killall
    [procps]=pkill
    [bindfs]=bindfs
    [util-linux]=nsenter
)

if [ "$RUNTIME_ONLY" = 1 ]; then
    unset APT_BIN
    declare -A APT_BIN=([fuse3]=fusermount3 [iproute2]=ip [util-linux]=nsenter [procps]=sysctl)
fi

missing=()
for pkg in "${!APT_BIN[@]}"; do
    if ! command -v "${APT_BIN[$pkg]}" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps.sh: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "install-deps.sh: Debian packages already present"
fi

if [ "$RUNTIME_ONLY" = 1 ]; then
    [ -c /dev/fuse ] || { echo "install-deps.sh: /dev/fuse is missing" >&2; exit 1; }
    echo "install-deps.sh: runtime dependencies present"
    exit 0
fi

# Rust rewrites of the POSIX conformance suite and the file system exerciser,
# both from crates.io (crate name = binary name).
export PATH="$HOME/.cargo/bin:$PATH"
for crate in pjdfstest fsx; do
    if command -v "$crate" >/dev/null 2>&1; then
        echo "install-deps.sh: $crate already installed"
    else
        echo "install-deps.sh: cargo install $crate --locked"
        cargo install "$crate" --locked
    fi
done

# pjdfstest switches to two unprivileged users: nobody:nogroup (Debian has
# them) and a "tests" user with its own group, created here once.
if ! getent group tests >/dev/null; then
    groupadd --system tests
fi
if ! getent passwd tests >/dev/null; then
    useradd --system --no-create-home --gid tests --shell /usr/sbin/nologin tests
fi

# The FUSE device must exist for the mount tests.
if [ ! -c /dev/fuse ]; then
    echo "install-deps.sh: /dev/fuse is missing: the mount tests cannot run here" >&2
    exit 1
fi
echo "install-deps.sh: done"
