"""The board side of ``sglp-edge deploy``: the POSIX ``sh`` scripts that run over SSH.

Three scripts, each its own ``ssh`` call, so that only a host that saw every earlier step succeed
ever switches ``current`` (a killed ``sglp-edge deploy`` can leave at most a staged release, never
a switched one):

* :func:`stage_script` unpacks the release into ``DIR/.incoming.XXXXXX``, checks every SHA-256,
  runs the minimal runner there, records the release id in the index and renames it into
  ``DIR/releases/<id>``. Nothing live changes.
* :func:`check_previous_script` (``--rollback``) checks the previous release's SHA256SUMS and runs
  its runner. Nothing changes.
* :func:`switch_script` moves ``current`` (and ``previous``) with rename(2), only if ``current`` is
  still what the first step saw, then removes the releases of the index that are neither.

Only what sglp-edge made is ever touched: ``DIR/.sglp-edge-releases.json`` (the index, written
atomically) lists the releases it created; a folder in ``releases/`` that is not listed there is
never removed. A ``DIR`` that holds anything but an sglp-edge layout is refused before any write.
``--to '~/x'`` is expanded by the board's shell to its ``$HOME``.

The two scripts that change ``DIR`` (stage and switch) each hold ``DIR/.sglp-edge-deploy.lock``
while they run (``mkdir`` is atomic; the lock goes when the script exits, by trap): a second deploy
into the same ``DIR`` meanwhile is refused ("another deploy into DIR is running") and changes nothing.
"""

from __future__ import annotations

import shlex

#: name of the index of the releases sglp-edge created, under the --to folder on the board
INDEX = ".sglp-edge-releases.json"
#: the lock folder a script that changes the --to folder holds while it runs
LOCK = ".sglp-edge-deploy.lock"
#: a release id (see :func:`sglp_edge.targets.deploy.pack`)
ID_RE = r"[0-9]{8}-[0-9]{6}-[0-9a-f]{10}"

_PRELUDE = r"""set -e
to=@TO@
case $to in "~") to=$HOME;; "~/"*) to=$HOME/${to#"~/"};; esac
case $to in /*) ;; *) echo "SGLP_DEPLOY=bad-home" >&2; exit 2;; esac
idx="$to/@INDEX@"
say() { echo "SGLP_DEPLOY=$*" >&2; }
valid_id() { printf '%s\n' "$1" | grep -Eqx '@ID_RE@'; }
ids() { if [ -f "$idx" ]; then sed -n 's/^ *"\([0-9a-f-]*\)",\{0,1\}$/\1/p' "$idx" | grep -Ex '@ID_RE@' || true; fi; }
in_index() { ids | grep -qx "$1"; }
write_index() {  # the ids given, written to a temporary name and renamed over the index
  t="$idx.tmp.$$"; seen=' '; s=''
  {
    printf '{\n  "tool": "sglp-edge deploy",\n  "format": 1,\n  "releases": ['
    for i in "$@"; do
      case $seen in *" $i "*) continue;; esac
      seen="$seen$i "; printf '%s\n    "%s"' "$s" "$i"; s=','
    done
    printf '\n  ]\n}\n'
  } > "$t"
  mv -f "$t" "$idx"
}
ours() {  # refuse what sglp-edge did not make; fresh=1 for a new or empty folder
  fresh=0
  if [ -e "$to" ] && [ ! -d "$to" ]; then say not-dir; exit 2; fi
  for l in current previous; do
    if [ -e "$to/$l" ] && [ ! -L "$to/$l" ]; then say "real-link $l"; exit 2; fi
  done
  if [ -f "$idx" ]; then return 0; fi
  if [ ! -d "$to" ] || [ -z "$(ls -A "$to" | grep -Fvx '@LOCK@')" ]; then fresh=1; return 0; fi
  keep=''  # an sglp-edge layout from before the index: adopt the releases current and previous name
  for l in current previous; do
    t=$(readlink "$to/$l" 2>/dev/null || true); i=${t#releases/}
    if [ "releases/$i" = "$t" ] && valid_id "$i" && [ -d "$to/$t" ]; then keep="$keep $i"; fi
  done
  if [ -z "$keep" ]; then say not-ours; exit 2; fi
  write_index $keep
}
on_exit=''
lock() {  # one script that changes $to at a time: mkdir is atomic; the lock goes when this script exits
  if [ -e "$to" ] && [ ! -d "$to" ]; then say not-dir; exit 2; fi
  mkdir -p "$to"
  if ! mkdir "$to/@LOCK@" 2>/dev/null; then
    if [ -d "$to/@LOCK@" ]; then say locked; exit 4; fi
    mkdir "$to/@LOCK@"  # not a lock held elsewhere: the real error
  fi
  trap 'eval "$on_exit"; rmdir "$to/@LOCK@" 2>/dev/null || true' EXIT
  trap 'exit 1' HUP INT TERM PIPE
}
verify() {  # in a release folder: every file against its SHA256SUMS
  if command -v sha256sum >/dev/null 2>&1; then
    if ! out=$(sha256sum -c SHA256SUMS 2>&1); then
      say "hash-mismatch $(printf '%s\n' "$out" | grep -v ': OK$' | head -n 3 | tr '\n' ' ')"; exit 3
    fi
  elif ! out=$(@PY@ -c 'import hashlib,sys
bad=[n for h,n in (l.split(None,1) for l in open("SHA256SUMS")) if hashlib.sha256(open(n.strip(),"rb").read()).hexdigest()!=h]
print(" ".join(n.strip()+": FAILED" for n in bad)); sys.exit(1 if bad else 0)' 2>&1); then
    say "hash-mismatch $(printf '%s\n' "$out" | tail -n 1)"; exit 3
  fi
}
runner() {  # in a release folder: the minimal runner answers one input
  if ! r=$(@PY@ run_model.py 2>&1); then say "runner-failed $(printf '%s\n' "$r" | grep . | tail -n 1)"; exit 5; fi
  echo "SGLP_RUNNER=$(printf '%s\n' "$r" | grep '^{' | tail -n 1)"
}
"""

_STAGE = r"""
rid=@RID@
ours  # a folder that is not ours is refused before anything (the lock too) is written in it
lock
ours
if [ "$fresh" = 1 ]; then mkdir -p "$to"; write_index; fi
mkdir -p "$to/releases"
cur=$(readlink "$to/current" 2>/dev/null || true)
if [ -e "$to/releases/$rid" ] && ! in_index "$rid"; then say "foreign $rid"; exit 2; fi
inc=$(mktemp -d "$to/.incoming.XXXXXX")
on_exit='rm -rf "$inc"'
m=$(umask); case $m in 0*) ;; *) m=0$m;; esac
chmod "$(printf '%o' $((0777 & ~$m)))" "$inc"
tar -xf - -C "$inc"
cd "$inc"
verify
if [ @CHECK@ = 1 ]; then runner; fi
cd /
in_index "$rid" || write_index $(ids) "$rid"
if [ "$cur" = "releases/$rid" ]; then rm -rf "$inc"
else rm -rf "$to/releases/$rid"; mv "$inc" "$to/releases/$rid"
fi
on_exit=''
echo "SGLP_DIR=$to"
echo "SGLP_CURRENT=$cur"
echo "SGLP_DEPLOY=staged"
"""

_CHECK_PREVIOUS = r"""
ours
if [ "$fresh" = 1 ]; then say no-previous; exit 4; fi
cur=$(readlink "$to/current" 2>/dev/null || true); prev=$(readlink "$to/previous" 2>/dev/null || true)
p=${prev#releases/}
if [ -z "$prev" ] || [ "releases/$p" != "$prev" ] || ! valid_id "$p" || [ ! -d "$to/$prev" ]; then
  say no-previous; exit 4
fi
if ! in_index "$p"; then say "foreign $p"; exit 2; fi
cd "$to/$prev"
verify
if [ @CHECK@ = 1 ]; then runner; fi
echo "SGLP_DIR=$to"
echo "SGLP_CURRENT=$cur"
echo "SGLP_PREVIOUS=$p"
echo "SGLP_DEPLOY=verified"
"""

_SWITCH = r"""
rid=@RID@; expect=@EXPECT@
if [ ! -f "$idx" ]; then say not-ours; exit 2; fi
lock
drop() {  # a refused switch leaves no staged release behind (unless it is live)
  if [ "$(readlink "$to/current" 2>/dev/null || true)" != "releases/$rid" ] &&
     [ "$(readlink "$to/previous" 2>/dev/null || true)" != "releases/$rid" ]; then
    rm -rf "$to/releases/$rid"; keep=''
    for i in $(ids); do if [ "$i" != "$rid" ]; then keep="$keep $i"; fi; done
    write_index $keep
  fi
}
for l in current previous; do
  if [ -e "$to/$l" ] && [ ! -L "$to/$l" ]; then drop; say "real-link $l"; exit 2; fi
done
cur=$(readlink "$to/current" 2>/dev/null || true)
if [ "$cur" != "$expect" ]; then drop; say changed; exit 2; fi
if ! in_index "$rid" || [ ! -d "$to/releases/$rid" ]; then say "missing $rid"; exit 2; fi
cd "$to"
on_exit='rm -f ".current.new.$$" ".previous.new.$$"'
ln -s "releases/$rid" ".current.new.$$"
mv -fT ".current.new.$$" current
if [ -n "$cur" ] && [ "$cur" != "releases/$rid" ]; then
  ln -s "$cur" ".previous.new.$$"
  mv -fT ".previous.new.$$" previous
fi
prev=$(readlink previous 2>/dev/null || true)
keep=''
for i in $(ids); do
  if [ "$i" = "$rid" ] || [ "releases/$i" = "$prev" ]; then keep="$keep $i"; else rm -rf "releases/$i"; fi
done
write_index $keep
echo "SGLP_DEPLOY=ok"
"""


def _fill(body: str, to: str, **kw: str) -> str:
    out = (_PRELUDE + body).replace("@TO@", shlex.quote(to)).replace("@INDEX@", INDEX).replace("@ID_RE@", ID_RE).replace("@LOCK@", LOCK)
    for k, v in kw.items():
        out = out.replace(f"@{k.upper()}@", v)
    return out


def stage_script(to: str, rid: str, python: str, check: bool) -> str:
    """Unpack stdin (a tar) as release ``rid``, verify it, run its runner (``check``), record it."""
    return _fill(_STAGE, to, rid=shlex.quote(rid), py=python, check="1" if check else "0")


def check_previous_script(to: str, python: str, check: bool) -> str:
    """Verify the ``previous`` release (hashes, then its runner when ``check``) without changing anything."""
    return _fill(_CHECK_PREVIOUS, to, py=python, check="1" if check else "0")


def switch_script(to: str, rid: str, expect: str, python: str) -> str:
    """Point ``current`` at ``releases/rid`` if it still points at ``expect``; drop releases no link keeps."""
    return _fill(_SWITCH, to, rid=shlex.quote(rid), expect=shlex.quote(expect), py=python)
