#!/bin/bash
# Inside the VM that tests/vm/run.sh boots: run pytest, leave its exit status
# in OUT/pytest.rc (run.sh fails without it). Arguments: REPO OUT SCALE; the
# pytest arguments are in OUT/pytest-args, one per line.
set -uo pipefail
repo=$1 out=$2 scale=$3
echo "imdsguard-vm: booted $(uname -r), cgroup $(stat -f -c %T /sys/fs/cgroup)"

# useradd cannot lock /etc/passwd on the overlay /etc: a private copy in tmpfs.
cp -a /etc /run/imdsguard-etc && mount --bind /run/imdsguard-etc /etc || exit 1

mapfile -t args < "$out/pytest-args"
cd "$repo" || exit 1
# The checkout is read-only here: no bytecode, cache or hypothesis database in it.
export PYTHONDONTWRITEBYTECODE=1 IMDSGUARD_TIME_SCALE=$scale IMDSGUARD_TEST_VM=1
.venv/bin/python -m pytest -p no:cacheprovider --basetemp=/tmp/pytest-vm \
  --junitxml="$out/junit.xml" -o junit_suite_name=test-vm -v --tb=short -rA "${args[@]}"
rc=$?
echo "$rc" > "$out/pytest.rc"
exit "$rc"
