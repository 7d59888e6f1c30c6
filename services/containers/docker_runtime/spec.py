"""A ContainerSpec as the docker SDK's `create_container` arguments (pure translation, no defaults added)."""

from __future__ import annotations

from typing import Any

import docker

from baaaht.schemas.containers import ContainerSpec

NANO = 1_000_000_000


def create_args(spec: ContainerSpec, api_version: str) -> dict[str, Any]:
    """`APIClient.create_container` keyword arguments for exactly this spec (no defaults added here)."""
    network_mode = spec.network_mode or (spec.networks[0] if spec.networks else "")
    resources = spec.resources
    restart = None
    if spec.restart_policy != "no":
        restart = {"Name": spec.restart_policy, "MaximumRetryCount": spec.restart_max_retries}
    host_config = docker.types.HostConfig(
        version=api_version,
        mounts=[
            docker.types.Mount(
                target=m.target,
                source=m.source or None,
                type=m.type,
                read_only=m.read_only,
                tmpfs_size=m.tmpfs_size or None,
                propagation=m.propagation or None,
            )
            for m in spec.mounts
        ],
        port_bindings={
            f"{p.container_port}/{p.protocol}": (p.host_ip, p.host_port or None) for p in spec.ports
        },
        network_mode=network_mode or None,
        nano_cpus=int(resources.cpus * NANO) or None,
        mem_limit=resources.memory or None,
        memswap_limit=resources.memory_swap or None,
        # Carried on its own: a pids limit never depends on another limit being set.
        pids_limit=resources.pids or None,
        restart_policy=restart,
        auto_remove=spec.remove_on_stop,
        read_only=spec.read_only_rootfs or None,
        group_add=spec.group_add or None,
        cap_add=spec.cap_add or None,
        cap_drop=spec.cap_drop or None,
        security_opt=spec.security_opt or None,
        privileged=spec.privileged,
        init=spec.init,
    )
    healthcheck = None
    if spec.healthcheck is not None:
        check = spec.healthcheck
        healthcheck = docker.types.Healthcheck(
            test=check.test,
            interval=int(check.interval * NANO),
            timeout=int(check.timeout * NANO),
            retries=check.retries,
            start_period=int(check.start_period * NANO),
        )
    return dict(
        image=spec.image,
        command=[*spec.command, *spec.args] or None,
        entrypoint=spec.entrypoint,
        environment=[f"{k}={v}" for k, v in spec.env.items()] or None,
        labels=dict(spec.labels),
        working_dir=spec.working_dir or None,
        user=spec.user or None,
        name=spec.name or None,
        ports=[(p.container_port, p.protocol) for p in spec.ports] or None,
        host_config=host_config,
        healthcheck=healthcheck,
        stdin_open=False,
        tty=False,
        detach=True,
    )
