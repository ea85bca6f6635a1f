"""Minimal reproduction: gloo ranks restarted by torchrun read the previous round's addresses.

Not a test (pytest does not collect it); see docs/torchrun.md. Run it with torch alone:

    python docs/torchrun_restart_repro.py            # plain init_process_group: most runs fail
    python docs/torchrun_restart_repro.py --scoped   # the store scoped per restart: every run passes
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python docs/torchrun_restart_repro.py   # a store per round: passes
    (--runs=N sets the number of torchrun runs, 5 by default)

Each run starts ``torchrun --standalone --nproc-per-node=2 --max-restarts=1`` on this file. Round 0:
both ranks join gloo, all-reduce once, then rank 1 SIGKILLs itself. torchrun restarts both ranks
(round 1) against the *same* agent-hosted TCPStore (MASTER_PORT), which still holds round 0's gloo
keys ("0" and "1": each rank's listening address). In round 1 rank 1 joins a second late, so rank 0
reads rank 1's round-0 address, which names a port nobody listens on any more. gloo picks which side
of a pair connects by comparing the two ports, so the ranks either both wait (a hang until the
timeout) or one connects to the dead port ("connectFullMesh failed ... Connection refused"; gloo
prints that port with its two bytes swapped, the script swaps them back).
"""
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

TIMEOUT = timedelta(seconds=15)  # short, so a failed round ends quickly


def _port(rank_info: bytes) -> int:
    """The port in gloo's per-rank record: hostname length, hostname, address length, sockaddr_in."""
    n = int.from_bytes(rank_info[:8], "little")
    return int.from_bytes(rank_info[8 + n + 8 + 2: 8 + n + 8 + 4], "big")


def worker(scoped: bool) -> None:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if attempt and rank == 1:
        time.sleep(1.0)  # the restarted rank 1 is a little slower, as a loaded machine makes it
    if attempt and rank == 0 and os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True":
        # evidence: the keys this round's gloo is about to read are already set (by round 0)
        probe = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=TIMEOUT)
        space = f"attempt_{attempt}/" if scoped else "default_pg/"  # init_process_group's key space
        keys = [f"{space}0//cpu//0/{r}" for r in range(world)]  # gloo's per-rank address keys
        set_ = {k: _port(probe.get(k)) for k in keys if probe.check([k])}
        print(f"round {attempt}, before init, already set (key: listening port): {set_}", flush=True)
    if scoped:  # what compressor.distributed.setup does: one key space per restart
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=TIMEOUT)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                                world_size=world, timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)  # env://, the agent's shared store
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world
    if attempt == 0 and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a worker dies; torchrun restarts the group
    dist.barrier()
    print(f"rank {rank} attempt {attempt}: ok", flush=True)
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    scoped = "--scoped" in argv
    runs = int(next((a.split("=")[1] for a in argv if a.startswith("--runs=")), "5"))
    failed = 0
    for i in range(runs):
        t0 = time.perf_counter()
        cmd = ["torchrun", "--standalone", "--nproc-per-node=2", "--max-restarts=1", __file__, "--worker"]
        cmd += ["--scoped"] if scoped else []
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              timeout=300)
        ok = done.returncode == 0 and done.stdout.count("attempt 1: ok") == 2
        failed += not ok
        why = full = ""
        if not ok:
            lines = [ln for ln in done.stderr.splitlines() if "connectFullMesh" in ln or "Timed out" in ln
                     or "timed out" in ln]
            full = lines[-1] if lines else done.stderr.strip().splitlines()[-1]
            why = full.strip()[:200]
        left = [ln for ln in done.stdout.splitlines() if "already set" in ln]
        remote = re.search(r"remote=\[[^]]*\]:(\d+)", full)
        if remote:  # gloo prints the port without ntohs: swap its bytes to compare it with the keys' ports
            port = int(remote.group(1))
            left.append(f"the port it tried to reach: {((port & 0xFF) << 8) | (port >> 8)}")
        print(f"run {i + 1}: {'pass' if ok else 'FAIL'} in {time.perf_counter() - t0:.1f}s {why}", flush=True)
        for line in left:
            print(f"  {line}", flush=True)
    print(f"{'scoped' if scoped else 'plain'}: {runs - failed}/{runs} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker("--scoped" in sys.argv)
    else:
        sys.exit(main(sys.argv[1:]))
