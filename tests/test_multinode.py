"""Chapter 09b: one job on several nodes, tried as two torchrun invocations meeting at 127.0.0.1.

Every call that starts processes has a timeout, so a hang fails the test instead of blocking the suite.
"""
import socket
import threading
import time

import pytest

from openllm_edu.core import CourseError
from openllm_edu.distributed import ALL_REDUCE_CHECK, free_port, torchrun_command
from openllm_edu.multinode import endpoint_problem, launch_node, parse_endpoint, rendezvous_flags

PROCESS_TIMEOUT = 120  # seconds, for any group of processes


def test_two_nodes_on_localhost_complete_an_all_reduce():
    "Two torchrun invocations (--nnodes 2, one process each) meet at a 127.0.0.1 rendezvous."
    endpoint = f"127.0.0.1:{free_port()}"
    jobs = {}

    def node(rank: int) -> None:
        jobs[rank] = launch_node(ALL_REDUCE_CHECK, nproc_per_node=1, nnodes=2, node_rank=rank,
                                 rdzv_endpoint=endpoint, join_timeout=60, timeout=PROCESS_TIMEOUT,
                                 capture_output=True, env={"OMP_NUM_THREADS": "1"})

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (1, 0)]  # the other node may come first
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(PROCESS_TIMEOUT + 30)
    assert sorted(jobs) == [0, 1], "a node did not finish"
    for rank, job in jobs.items():
        assert job.returncode == 0, job.stderr[-2000:]
        assert f"rank {rank} of 2" in job.stdout and "all-reduce 3, expected 3, ok" in job.stdout


# ---------------------------------------------------------------- bad input: one line that says what to do

@pytest.mark.parametrize("arguments, message", [
    (dict(nnodes=0), "--nnodes must be a whole number >= 1"),
    (dict(nnodes=2), "needs --rdzv-endpoint HOST:PORT"),
    (dict(nnodes=2, node_rank=2, rdzv_endpoint="node0:29500"), r"--node-rank 2 must be in \[0, --nnodes 2\)"),
    (dict(nnodes=2, node_rank=1, rdzv_endpoint="node0"), "must be HOST:PORT"),
])
def test_bad_rendezvous_arguments(arguments, message):
    arguments = {"node_rank": 0, "rdzv_endpoint": None, **arguments}
    with pytest.raises(CourseError, match=message):
        rendezvous_flags(**arguments)


@pytest.mark.parametrize("arguments, message", [
    (dict(nproc_per_node=0), "--nproc-per-node must be a whole number >= 1"),
    (dict(program=[]), "nothing to launch"),
])
def test_every_argument_is_checked_before_waiting_on_the_endpoint(arguments, message):
    arguments = {"program": ["train.py"], "nnodes": 2, "node_rank": 1, "rdzv_endpoint": f"127.0.0.1:{free_port()}",
                 "join_timeout": 30, **arguments}
    began = time.monotonic()
    with pytest.raises(CourseError, match=message):
        launch_node(**arguments)
    assert time.monotonic() - began < 5


def test_launch_commands():
    one = rendezvous_flags(1, 0, None)
    assert torchrun_command(["train.py"], 2, one) == torchrun_command(["train.py"], 2), "one node is chapter 09's"
    multi = torchrun_command(["train.py"], nproc_per_node=1,
                             rendezvous=rendezvous_flags(2, 1, "node0:29500", join_timeout=30))
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=static", "--rdzv-endpoint=node0:29500",
            "--rdzv-conf=timeout=30"} <= set(multi)
    assert "--standalone" not in multi
    assert parse_endpoint("[::1]:29500") == ("::1", 29500) and parse_endpoint("node0:1") == ("node0", 1)


def test_unreachable_endpoint_is_reported_not_waited_for():
    began = time.monotonic()
    with pytest.raises(CourseError, match="nothing answers at 127.0.0.1:.* start node 0"):
        launch_node(ALL_REDUCE_CHECK, nnodes=2, node_rank=1, rdzv_endpoint=f"127.0.0.1:{free_port()}",
                    join_timeout=2)
    assert time.monotonic() - began < 10
    with pytest.raises(CourseError, match="node 0 cannot listen on 192.0.2.1:29500"):
        launch_node(ALL_REDUCE_CHECK, nnodes=2, node_rank=0, rdzv_endpoint="192.0.2.1:29500")


def test_endpoint_problems_name_their_cause():
    with socket.socket() as node0:
        node0.bind(("127.0.0.1", 0))
        node0.listen()
        taken = f"127.0.0.1:{node0.getsockname()[1]}"
        assert "already in use" in endpoint_problem(taken, node_rank=0, wait_s=1)
        assert endpoint_problem(taken, node_rank=1, wait_s=1) is None
    assert endpoint_problem(f"127.0.0.1:{free_port()}", node_rank=0, wait_s=1) is None


def test_a_node_whose_peers_never_come_gives_up_after_the_join_timeout():
    began = time.monotonic()
    job = launch_node(ALL_REDUCE_CHECK, nproc_per_node=1, nnodes=2, node_rank=0,
                      rdzv_endpoint=f"127.0.0.1:{free_port()}", join_timeout=3, timeout=PROCESS_TIMEOUT,
                      capture_output=True, env={"OMP_NUM_THREADS": "1"})
    assert job.returncode != 0 and "waiting for clients" in job.stderr
    assert time.monotonic() - began < 45
