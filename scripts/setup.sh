# Sourced by scripts/test and scripts/quickstart: install what berth needs on a fresh
# Debian 12 machine (as root), then a virtualenv at .venv with berth and its extras.
# Idempotent: a second run installs nothing new.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# $1: what for; rest: Debian packages, installed only if a command they provide is missing
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "missing Debian packages: ${missing[*]}; run as root or install them first"; exit 1
  fi
  say "installing Debian packages: ${missing[*]}"
  local started=$SECONDS
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  say "Debian packages installed in $((SECONDS - started)) s"
}

# pip, quiet: some machines' pip configuration names local indexes that do not exist, and pip
# warns about each once per package; those lines say nothing about berth.
pip_quiet() {
  "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
  return "${PIPESTATUS[0]}"
}

# $1: pip extras, e.g. "agent,test"
make_venv() {
  local extras="$1" started=$SECONDS
  local stamp="$VENV/.berth-installed-$(cat "$ROOT/pyproject.toml" "$ROOT/serving/_express.c" | sha256sum | cut -c1-12)-${extras//,/_}"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtualenv $VENV"
    python3 -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ]; then
    say "installing berth[$extras] into $VENV"
    pip_quiet "$VENV/bin/python" -m pip install -q --upgrade pip
    pip_quiet "$VENV/bin/python" -m pip install -q -e "$ROOT[$extras]"
    rm -f "$VENV"/.berth-installed-*
    touch "$stamp"
    say "berth installed in $((SECONDS - started)) s"
  fi
  export PATH="$VENV/bin:$PATH"
}
