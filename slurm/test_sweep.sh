#!/usr/bin/env bash
# make test-slurm: a real one-node SLURM on localhost (slurm/local_cluster.sh) runs a small toy sweep through
# the project's launcher (sweep=toy2d_bandwidth hydra/launcher=slurm) as one SLURM job array, then checks:
#   - the submitted sbatch script is the one `python -m eval.slurm_dry_run` prints for the same arguments;
#   - the setup lines ran, and every array task's run directory holds final.json (no other run directory);
#   - a task signalled as SLURM signals a job before its time limit (USR2) once its run has saved a
#     checkpoint.pt is requeued by submitit, and its rerun resumes from that checkpoint in the same run directory;
#   - the aggregated table has one row per run (python -m eval.sweeps --expect, into the temporary directory).
# The cluster is stopped on success and on failure; everything lives in one temporary directory, removed on
# success and kept (with the sweep's logs) on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
JOBS=4
work=$(mktemp -d /tmp/msd-test-slurm.XXXXXX)
chmod 755 "$work"  # munged runs as the munge user and must reach its socket below
export MSD_SLURM_STATE=$work/cluster
sweep_dir=$work/sweep

fail() { echo "test-slurm: FAILED: $*" >&2; exit 1; }

finish() {
    local rc=$?
    if [[ -n ${sweep_pid:-} ]] && kill -0 "$sweep_pid" 2>/dev/null; then kill "$sweep_pid"; fi
    if [[ -d $MSD_SLURM_STATE ]]; then  # still up: the test failed before its own stop
        cp "$MSD_SLURM_STATE"/*.log "$work/" 2>/dev/null || true  # stop removes the state directory
        slurm/local_cluster.sh stop
    fi
    if ((rc == 0)); then
        rm -rf "$work"
    else
        echo "test-slurm: sweep log tail ($work/sweep.log):" >&2
        tail -n 15 "$work/sweep.log" >&2 2>/dev/null || true
        echo "test-slurm: logs kept in $work (sweep.log, slurmctld.log, slurmd.log, sweep/.submitit/)" >&2
    fi
    exit "$rc"
}
trap finish EXIT

ARGS=(sweep=toy2d_bandwidth hydra/launcher=slurm hydra.launcher.partition=local hydra.launcher.mem_gb=1
      hydra.launcher.timeout_min=10 hydra.launcher.array_parallelism=2
      'hydra.launcher.setup=["echo msd-test-slurm-setup-ran"]' "hydra.sweep.dir=$sweep_dir"
      guidance.lambda0=0.1,0.31622776601683794 guidance.lambda_min=0.01,0.03
      task.grid_size=32 task.steps=150 task.checkpoint_every=5 task.eval.n_reference=20000 logger=none
      task.progress_bar=false)

# 1. what will be submitted (no cluster needed): the script and array task -> run directory
$PY -m eval.slurm_dry_run "${ARGS[@]}" > "$work/dry_run.txt"
mapfile -t run_dirs < <(sed -n 's/^# [0-9]*: .* -> //p' "$work/dry_run.txt")
((${#run_dirs[@]} == JOBS)) || fail "dry run lists ${#run_dirs[@]} array tasks, expected $JOBS"
grep -qx -- "#SBATCH --array=0-$((JOBS - 1))%2" "$work/dry_run.txt" || fail "dry run has no --array=0-$((JOBS - 1))%2"

# 2. the cluster, and the sweep through the launcher (blocks until every array task is done)
slurm/local_cluster.sh start
export SLURM_CONF=$MSD_SLURM_STATE/slurm.conf
start=$SECONDS
timeout 900 "$PY" -m experiments.run "${ARGS[@]}" > "$work/sweep.log" 2>&1 &
sweep_pid=$!

# 3. preemption/timeout path: USR2 to one running task once its run has saved a checkpoint (submitit's signal
# handler is installed before the run starts), as SLURM signals a job signal_delay_s before its time limit;
# then wait for submitit's requeue and lift SLURM's ~2 min BeginTime hold on requeued jobs.
target=
deadline=$((SECONDS + 300))
until [[ -n $target ]]; do
    ((SECONDS < deadline)) || fail "no array task saved a checkpoint within 300 s"
    kill -0 "$sweep_pid" 2>/dev/null || fail "the sweep exited before any task could be signalled"
    for id in $(squeue -h -t RUNNING -o %i); do
        run_dir=${run_dirs[${id#*_}]}
        if [[ -f $run_dir/checkpoint.pt && ! -f $run_dir/final.json ]]; then target=$id; break; fi
    done
    sleep 0.2
done
# SLURM 22.05 can deliver the signal and still answer "Job is in transitional state", on which scancel retries
# for a minute (and would signal the requeued run): send once, then look for the requeue itself.
timeout 4 scancel --verbose --signal=USR2 "$target" 2>> "$work/scancel.log" || true
echo "test-slurm: sent USR2 to array task $target"
deadline=$((SECONDS + 120))
until scontrol show job "$target" | grep -q 'JobState=PENDING.*Reason=BeginTime'; do
    ((SECONDS < deadline)) || fail "array task $target was not requeued within 120 s"
    sleep 0.5
done
scontrol update JobId="$target" StartTime=now

wait "$sweep_pid" || fail "the sweep exited with status $?"
sweep_pid=
echo "test-slurm: $JOBS-task array finished in $((SECONDS - start)) s (with one requeue)"

# 4. checks
submissions=("$sweep_dir"/.submitit/*/*_submission.sh)
((${#submissions[@]} == 1)) || fail "expected one sbatch submission (one array), found: ${submissions[*]}"
submission=${submissions[0]}
diff <(grep -E '^(#SBATCH|srun) ' "$work/dry_run.txt") <(grep -E '^(#SBATCH|srun) ' "$submission") \
    || fail "the submitted script ($submission) differs from the dry run"
grep -q 'Requeued job' "$sweep_dir/.submitit/$target/${target}_0_log.out" || fail "$target was not requeued by submitit"
grep -q 'resuming msd/exact/w=1 from step' "$sweep_dir/.submitit/$target/${target}_0_log.out" \
    || fail "the requeued $target did not resume from its checkpoint"
grep -q msd-test-slurm-setup-ran "$sweep_dir"/.submitit/*/*_log.out || fail "the setup lines did not run"
missing=()
for run_dir in "${run_dirs[@]}"; do
    [[ -f $run_dir/final.json ]] || missing+=("$run_dir")
done
((${#missing[@]} == 0)) || fail "no final.json in: ${missing[*]}"
n_dirs=$(find "$sweep_dir" -mindepth 1 -maxdepth 1 -type d ! -name .submitit | wc -l)
((n_dirs == JOBS)) || fail "$n_dirs run directories in $sweep_dir, expected $JOBS (the requeued run must reuse its own)"
slurm/local_cluster.sh stop  # the table needs no cluster

# 5. the aggregated table (never into results/): --expect fails naming any unfinished run directory
$PY -m eval.sweeps "$sweep_dir" --name test_slurm --out-dir "$work/tables" --expect "$JOBS" > "$work/aggregate.log"
$PY -c 'import sys, pandas as pd; n = len(pd.read_csv(sys.argv[1])); sys.exit(None if n == int(sys.argv[2]) else f"{n} rows")' \
    "$work/tables/test_slurm.csv" "$JOBS" || fail "$work/tables/test_slurm.csv does not have $JOBS rows"
echo "test-slurm: OK: $JOBS runs in their run directories and $JOBS table rows; dry run == submitted script;" \
     "the requeued run resumed from its checkpoint in its own run directory"
