"""deploy/k8s: both overlays render with ``kubectl kustomize`` and validate against the
Kubernetes 1.37 schemas (``kubernetes-validate --strict``); what they render holds together:
gRPC probes on every expert's port, a PodDisruptionBudget and a NetworkPolicy over every
Deployment, only the Sampler let in to the experts, GPUs requested in the gpu overlay only, no
committed secret, the Sampler's experts the headless Services. The Sampler settings and the
cluster spec then run a real job against real experts reached through ``dns:///`` targets, and
the autoscaler's metric is computed from a series a real expert host exports.

Rendering needs the token files (``deploy/tokens.sh``), which are never committed: the tests
render a copy of ``deploy/`` with tokens written into it, as docs/deploy.md says.
"""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from helpers.docs import docs_section
from helpers.remote import LoopThread
from helpers.server import velocity_request
from helpers.timing import scaled

from poegen.clients.files import validate_model
from poegen.clients.sdk import Client
from poegen.clients.spec import GenerationSpec
from poegen.expert_servers.server import ServerConfig
from poegen.expert_servers.server.expert_file import build_expert, parse_expert_file
from poegen.kernel.service import SamplerServerConfig
from poegen.v1 import expert_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
BIN = Path(sys.executable).parent
OVERLAYS = ("cpu", "gpu")
TOKENS = ("expert-token", "admin-token", "sampler-token")
KUBERNETES = "1.37"
EXPERT_SERVICE = "poegen.v1.ExpertService"


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A docs command, its program taken from this venv (the dev extra's versions)."""
    program = BIN / argv[0] if (BIN / argv[0]).exists() else Path(argv[0])
    return subprocess.run(
        [str(program), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=scaled(120)
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ with the tokens written by the docs' first Kubernetes command."""
    root = tmp_path_factory.mktemp("repo")
    # tokens a developer wrote here by following the docs stay out: the copy gets fresh ones
    shutil.copytree(REPO / "deploy", root / "deploy", ignore=shutil.ignore_patterns(*TOKENS))
    first = shlex.split(docs_section("Kubernetes")[0])
    assert first == ["sh", "deploy/tokens.sh", "deploy/k8s/base/secrets"]
    assert run(first, root).returncode == 0
    return root


@pytest.fixture(scope="module")
def rendered(checkout: Path) -> dict[str, list[dict[str, Any]]]:
    """Each overlay as `kubectl kustomize deploy/k8s/overlays/NAME` prints it."""
    out = {}
    for overlay in OVERLAYS:
        done = run(["kubectl", "kustomize", f"deploy/k8s/overlays/{overlay}"], checkout)
        assert done.returncode == 0, done.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in match_labels.items())


def experts(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].startswith("expert-")]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


# --------------------------------------------------------------------------- render + schema


def test_the_docs_render_and_validate_commands_pass(checkout: Path) -> None:
    """kubectl kustomize > FILE, then kubernetes-validate --strict FILE, as the docs run them."""
    commands = docs_section("Kubernetes")
    render = [c for c in commands if c.startswith("kubectl kustomize ")]
    validate = [c for c in commands if c.startswith("kubernetes-validate ")]
    assert len(render) == len(validate) == 1
    program, _, target = render[0].partition(" > ")
    done = run(shlex.split(program), checkout)
    assert done.returncode == 0, done.stderr
    (checkout / target).write_text(done.stdout)
    checked = run(shlex.split(validate[0]), checkout)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert shlex.split(validate[0])[-1] == target
    # a kind without a schema is only a warning for the CLI: none may be left unchecked
    assert "WARN" not in checked.stdout and "ERROR" not in checked.stdout, checked.stdout
    assert checked.stdout.count("passed for resource") == len(list(yaml.safe_load_all(done.stdout)))


def test_the_gpu_overlay_validates_strictly_too(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The docs' command validates the cpu overlay; the gpu overlay goes through the same
    schemas in-process (where a kind without a schema raises instead of warning)."""
    for doc in rendered["gpu"]:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validation_refuses_a_misspelt_probe(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validation can fail: an unknown field in a probe is an error under --strict."""
    deployment = yaml.safe_load(yaml.safe_dump(experts(rendered["cpu"])[0]))
    container(deployment)["livenessProbe"]["periodSecs"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


# --------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_expert_has_grpc_probes_on_its_port(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    deployments = experts(rendered[overlay])
    assert {d["metadata"]["name"] for d in deployments} == {
        f"expert-{name}" for name in ("ring", "bar", "all", "low", "even", "reward")
    }
    for deployment in deployments:
        main = container(deployment)
        (port,) = [p["containerPort"] for p in main["ports"] if p["name"] == "grpc"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[probe]["grpc"]["port"] == port, (deployment["metadata"]["name"], probe)
        assert main["startupProbe"]["grpc"]["service"] == EXPERT_SERVICE
        assert main["readinessProbe"]["grpc"]["service"] == EXPERT_SERVICE
        startup = main["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # slow loads


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_is_covered_by_a_pdb_and_a_network_policy(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    pdbs = of_kind(docs, "PodDisruptionBudget")
    policies = of_kind(docs, "NetworkPolicy")
    for deployment in of_kind(docs, "Deployment"):
        labels, name = pod_labels(deployment), deployment["metadata"]["name"]
        assert any(selects(p["spec"]["selector"]["matchLabels"], labels) for p in pdbs), name
        assert any(selects(p["spec"]["podSelector"]["matchLabels"], labels) for p in policies), name


def test_only_the_sampler_reaches_the_experts_grpc_port(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["cpu"]
    (sampler,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "sampler"]
    for deployment in experts(docs):
        port = next(
            p["containerPort"] for p in container(deployment)["ports"] if p["name"] == "grpc"
        )
        for policy in of_kind(docs, "NetworkPolicy"):
            if not selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(deployment)):
                continue
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"]["ingress"]:
                if port not in [p["port"] for p in rule.get("ports", [])]:
                    continue
                (peer,) = rule["from"]
                assert set(peer) == {"podSelector"}, rule  # no namespace or IP block
                assert selects(peer["podSelector"]["matchLabels"], pod_labels(sampler))
                assert not any(
                    selects(peer["podSelector"]["matchLabels"], pod_labels(e))
                    for e in experts(docs)
                )


def test_each_expert_has_a_headless_service_and_an_autoscaler_on_rpcs_in_flight(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["cpu"]
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    autoscalers = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    for deployment in experts(docs):
        name = deployment["metadata"]["name"]
        service = services[name]
        assert service["spec"]["clusterIP"] == "None"
        assert selects(service["spec"]["selector"], pod_labels(deployment))
        others = [d for d in experts(docs) if d is not deployment]
        assert not any(selects(service["spec"]["selector"], pod_labels(d)) for d in others)
        (metric,) = autoscalers[name]["spec"]["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]


def test_the_gpu_overlay_requests_gpus_for_the_flow_experts_only(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay in OVERLAYS:
        for deployment in of_kind(rendered[overlay], "Deployment"):
            main, name = container(deployment), deployment["metadata"]["name"]
            flow = pod_labels(deployment).get("poegen.dev/family") == "flow"
            on_gpu = overlay == "gpu" and flow
            resources = main["resources"]
            for part in ("requests", "limits"):
                assert (resources[part].get("nvidia.com/gpu") == "1") == on_gpu, (overlay, name)
            assert main["image"].endswith(":cuda" if on_gpu else ":cpu"), (overlay, name)
    assert len([d for d in experts(rendered["gpu"]) if "nvidia.com/gpu" in str(d)]) == 4


def test_no_secret_value_is_committed(
    rendered: dict[str, list[dict[str, Any]]], checkout: Path
) -> None:
    """The one Secret holds exactly the token files written for this render; no committed
    manifest is a Secret, and the token files are git-ignored."""
    written = {name: (checkout / "deploy/k8s/base/secrets" / name).read_text() for name in TOKENS}
    for overlay in OVERLAYS:
        (secret,) = of_kind(rendered[overlay], "Secret")
        values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert values == written
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path
    # what is committed, or would be by `git add`: tracked files and untracked, unignored ones
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    committable = subprocess.run(
        [*listed, "deploy/k8s/base/secrets"], cwd=REPO, capture_output=True, text=True
    )
    assert committable.stdout.split() == ["deploy/k8s/base/secrets/.gitignore"]
    for token in TOKENS:
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", f"deploy/k8s/base/secrets/{token}"], cwd=REPO
        )
        assert ignored.returncode == 0, token


def sampler_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (config,) = [
        c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("sampler-config")
    ]
    return yaml.safe_load(config["data"]["sampler.yaml"])["sampler"]


def test_the_sampler_calls_the_experts_headless_services(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["cpu"]
    settings = sampler_config(docs)
    expected = {
        f"dns:///{s['metadata']['name']}:{p['port']}"
        for s in of_kind(docs, "Service")
        if s["spec"].get("clusterIP") == "None"
        for p in s["spec"]["ports"]
        if p["name"] == "grpc"
    }
    assert set(settings["allowed_experts"]) == expected and len(expected) == 6
    SamplerServerConfig.model_validate({**settings, "expert_token": "x"})
    (sampler,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == "sampler"]
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in container(sampler)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert env == {"POEGEN_TOKEN": "sampler-token", "POEGEN_EXPERT_TOKEN": "expert-token"}


def test_the_analytic_experts_serve_the_examples_files() -> None:
    for name in ("ring", "bar"):
        copy = K8S / "base" / "experts" / name / f"{name}.yaml"
        assert copy.read_text() == (REPO / "examples" / "experts" / f"{name}.yaml").read_text()


# --------------------------------------------------------------------------- a real job


def test_the_cluster_spec_runs_through_dns_targets_with_tokens(loop: LoopThread) -> None:
    """The cluster's Sampler settings and deploy/k8s/t1.yaml against real ring and bar hosts
    (the ConfigMaps' files), each reached as dns:///localhost:PORT in place of
    dns:///expert-NAME:50051, with the expert and sampler tokens set."""
    expert_token, sampler_token = "e" * 64, "s" * 64
    ports = {}
    for name in ("ring", "bar"):
        data = yaml.safe_load((K8S / "base" / "experts" / name / f"{name}.yaml").read_text())
        served = loop.serve(build_expert(parse_expert_file(data)), ServerConfig(token=expert_token))
        ports[f"dns:///expert-{name}:50051"] = f"dns:///localhost:{served.port}"
    settings = yaml.safe_load((K8S / "base" / "sampler" / "sampler.yaml").read_text())["sampler"]
    local = {
        **settings,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "allowed_experts": [ports.get(a, a) for a in settings["allowed_experts"]],
        "token": sampler_token,
        "expert_token": expert_token,
    }
    sampler = loop.sampler(SamplerServerConfig.model_validate(local))
    spec = yaml.safe_load((K8S / "t1.yaml").read_text())
    spec["settings"] = {"num_particles": 32, "num_steps": 8}
    for expert in spec["experts"]:
        expert["address"] = ports[expert["address"]]
    with Client(sampler.address, token=sampler_token) as client:
        result = client.generate(validate_model(GenerationSpec, spec, source="t1.yaml"))
    assert tuple(result.particles.shape) == (32, 2)


def test_the_cluster_spec_is_the_example_with_cluster_addresses() -> None:
    spec = yaml.safe_load((K8S / "t1.yaml").read_text())
    example = yaml.safe_load((REPO / "examples" / "t1.yaml").read_text())
    assert {k: v for k, v in spec.items() if k not in ("experts", "sample_shape", "output")} == {
        k: v for k, v in example.items() if k != "experts"
    }
    assert [e["address"] for e in spec["experts"]] == [
        f"dns:///expert-{e['endpoint']}:50051" for e in example["experts"]
    ]


# ----------------------------------------------------------------------- the autoscaler's metric


def adapter_rule() -> dict[str, Any]:
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter.yaml").read_text())["rules"]["custom"]
    return rule


def test_the_adapter_rule_reads_a_series_an_expert_host_exports(loop: LoopThread) -> None:
    """A real host with metrics on, after one Velocity call: the rule's series exists with a
    method label its regex selects, and the health service's calls are not selected."""
    rule = adapter_rule()
    series_match = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"])
    method_match = re.search(r'method=~"([^"]+)"', rule["metricsQuery"])
    assert series_match and method_match, rule
    series, method_regex = series_match.group(1), method_match.group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert "rate(<<.Series>>" in rule["metricsQuery"]

    data = yaml.safe_load((REPO / "examples" / "experts" / "ring.yaml").read_text())
    served = loop.serve(build_expert(parse_expert_file(data)), ServerConfig(metrics_port=0))
    with grpc.insecure_channel(served.address) as channel:
        expert_pb2_grpc.ExpertServiceStub(channel).Velocity(velocity_request(), timeout=scaled(10))
    port = served.host.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=scaled(10)).read()
    methods = re.findall(rf'^{series}{{method="([^"]+)"}}', text.decode(), re.M)
    assert "/poegen.v1.ExpertService/Velocity" in methods
    # PromQL regex matchers are anchored at both ends, as fullmatch is
    assert re.fullmatch(method_regex, "/poegen.v1.ExpertService/Velocity")
    assert not re.fullmatch(method_regex, "/grpc.health.v1.Health/Check")
    assert not re.fullmatch(method_regex, "/poegen.v1.ExpertService/LoadModel")


# --------------------------------------------------------------------------- docs


def test_the_docs_kubernetes_commands_run_or_name_what_is_checked_here(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """tokens.sh, kustomize and kubernetes-validate run (the fixtures and the first test);
    apply -k names an overlay rendered above; port-forward names the rendered Sampler Service
    and port; generate's spec loads and calls only experts the Sampler may call; helm's values
    file is the adapter rule checked above."""
    commands = docs_section("Kubernetes")
    sampler_service = next(
        s for s in of_kind(rendered["cpu"], "Service") if s["metadata"]["name"] == "sampler"
    )
    repositories: set[str] = set()
    for command in commands:
        argv = shlex.split(command)
        if argv[0] in ("sh", "kubernetes-validate") or argv[:2] == ["kubectl", "kustomize"]:
            continue  # run by the fixtures and test_the_docs_render_and_validate_commands_pass
        if argv[:3] == ["kubectl", "apply", "-k"]:
            assert argv[3] in [f"deploy/k8s/overlays/{o}" for o in OVERLAYS], command
        elif argv[:2] == ["kubectl", "-n"]:
            namespace, _, target, ports = argv[2:]
            assert namespace == sampler_service["metadata"]["namespace"]
            assert target == f"service/{sampler_service['metadata']['name']}"
            local, remote = map(int, ports.split(":"))
            assert remote in [p["port"] for p in sampler_service["spec"]["ports"]]
            assert local == remote
        elif "poegen generate" in command:
            prefix = 'POEGEN_TOKEN="$(cat deploy/k8s/base/secrets/sampler-token)" '
            assert command.startswith(prefix), command
            words = shlex.split(command.removeprefix(prefix))
            assert words[:3] == ["poegen", "generate", "deploy/k8s/t1.yaml"]
            assert words[words.index("--sampler") + 1] == "127.0.0.1:50050"
            spec = validate_model(
                GenerationSpec, yaml.safe_load((REPO / words[2]).read_text()), source=words[2]
            )
            allowed = set(sampler_config(rendered["cpu"])["allowed_experts"])
            assert spec.sample_shape and spec.output.decode == "none"
            assert all(e.address in allowed for e in spec.experts)
        elif argv[:3] == ["helm", "repo", "add"]:
            repositories.add(argv[3])
        elif argv[:2] == ["helm", "install"]:
            assert argv[3].split("/")[0] in repositories, command  # added before
            assert argv[argv.index("-f") + 1] == "deploy/k8s/prometheus-adapter.yaml"
            namespace = argv[argv.index("-n") + 1]
            policy = next(
                p
                for p in of_kind(rendered["cpu"], "NetworkPolicy")
                if p["metadata"]["name"] == "experts-from-sampler"
            )
            admitted = [
                peer["namespaceSelector"]["matchLabels"]
                for rule in policy["spec"]["ingress"]
                for peer in rule["from"]
                if "namespaceSelector" in peer
            ]
            assert admitted == [{"kubernetes.io/metadata.name": namespace}]
        else:
            raise AssertionError(f"docs/deploy.md: unchecked command {command!r}")
