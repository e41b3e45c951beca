"""Interop with code nobody here wrote: tritonclient (the Triton/KServe v2 HTTP client) against
`toolkit serve` with the shipped models and their real test images; the same client code
driven by the Triton repository `toolkit export --triton` writes (its config.pbtxt must agree
with our metadata, name for name, type for type, dim for dim); and the example manifests in
deploy/ that run that repository (or our image) on a cluster.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from PIL import Image
from tritonclient.http.auth import BasicAuth
from tritonclient.utils import InferenceServerException

from serving.answer import classify
from serving.api.oip import MAX_BATCH_SIZE, triton_name
from serving.catalog import Catalog, load_catalog
from tests.test_app import running_demo

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
DEPLOY = ROOT / "deploy"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(ARTIFACTS)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_demo(ARTIFACTS) as url:
        yield url


def client_for(url: str) -> triton.InferenceServerClient:
    """tritonclient takes host:port, no scheme."""
    address = url.removeprefix("http://").rstrip("/")
    return triton.InferenceServerClient(
        address, connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )


@pytest.fixture(scope="module")
def client(server) -> Iterator[triton.InferenceServerClient]:
    client = client_for(server)
    yield client
    client.close()


def real_images(catalog: Catalog, key: str) -> list[Path]:
    """The shipped test images: the examples, and the model's known failures."""
    return [*catalog.examples["cifar10"], *(f.path for f in catalog.get(key).failures)]


# --- a client script, as someone would write it against Triton ----------------------------------


def top1_with(client: triton.InferenceServerClient, model: str, paths: list[Path]) -> list[str]:
    """What a Triton user's script does: read the model's input from its metadata, scale the
    RGB pixels to [0, 1], send one FP32 batch (binary, tritonclient's default), read back the
    probabilities and the classification extension's top label."""
    meta = client.get_model_metadata(model)
    (spec,) = meta["inputs"]
    height, width = spec["shape"][2:]
    pixels = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        assert image.size == (width, height), "the shipped test images are at the input size"
        pixels.append(np.asarray(image))
    batch = (np.stack(pixels).transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    tensor = triton.InferInput(spec["name"], list(batch.shape), spec["datatype"])
    tensor.set_data_from_numpy(batch)
    probs = client.infer(model, [tensor]).as_numpy("probs")  # every output, binary
    labelled = client.infer(
        model, [tensor], outputs=[triton.InferRequestedOutput("probs", class_count=1)]
    ).as_numpy("probs")
    top = [item[0].decode().split(":") for item in labelled]  # "<value>:<index>:<label>"
    assert [int(index) for _, index, _ in top] == probs.argmax(axis=1).tolist()
    return [label for _, _, label in top]


# --- against `toolkit serve` -----------------------------------------------------------------


def test_tritonclient_sees_a_live_ready_server_and_every_model(client, catalog):
    assert client.is_server_live() and client.is_server_ready()
    assert {"classification", "binary_tensor_data"} <= set(
        client.get_server_metadata()["extensions"]
    )
    for key, served in catalog.models.items():
        for name in (key, triton_name(served.classifier.metadata)):
            assert client.is_model_ready(name) and client.is_model_ready(name, "1")
            meta = client.get_model_metadata(name)
            assert meta["name"] == name
            assert [o["name"] for o in meta["outputs"]] == ["logits", "probs"]
    assert not client.is_model_ready("cifar10_vgg99")


def test_tritonclient_infer_on_real_test_images_agrees_with_the_page(client, catalog):
    for key, served in catalog.models.items():
        paths = real_images(catalog, key)
        answered = top1_with(client, triton_name(served.classifier.metadata), paths)
        # The page's own function (tests/test_oip_server.py shows /classify and the page agree).
        page = [classify(served, path, path.name)[0]["confidences"][0]["label"] for path in paths]
        assert answered == page, key
        failures = [f.predicted for f in served.failures]
        assert answered[-len(failures) :] == failures  # the known failures, reproduced


def test_tritonclient_errors_carry_the_servers_message(client):
    tensor = triton.InferInput("image", [1, 3, 16, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InferenceServerException, match=r"does not fit input 'image'") as info:
        client.infer("cifar10_net", [tensor])
    assert info.value.status() == "400"
    with pytest.raises(InferenceServerException, match=r"unknown model 'cifar10_vgg99'"):
        client.get_model_metadata("cifar10_vgg99")


def test_tritonclient_sends_http_basic_credentials_when_auth_is_on(catalog):
    images = catalog.examples["cifar10"][:2]
    with running_demo(ARTIFACTS, auth=("ana", "s3cret")) as url:
        anonymous = client_for(url)
        assert anonymous.is_server_ready()  # the probes need no password
        with pytest.raises(InferenceServerException, match="user name and password"):
            anonymous.get_model_metadata("cifar10_net")
        anonymous.close()
        authed = client_for(url)
        authed.register_plugin(BasicAuth("ana", "s3cret"))
        assert len(top1_with(authed, "cifar10_net", images)) == 2
        authed.close()


# --- the Triton repository `toolkit export --triton` writes -------------------------------------


@pytest.fixture(scope="module")
def triton_repository(catalog, tmp_path_factory) -> Path:
    """What `toolkit export --triton DIR` lays out for each shipped model (the writer needs
    torch, installed wherever the tests run)."""
    pytest.importorskip("torch")
    from toolkit.export.triton import write_triton_repo

    repo = tmp_path_factory.mktemp("triton")
    for served in catalog.models.values():
        path = served.classifier.path
        write_triton_repo(repo, path.read_bytes(), served.classifier.metadata)
    return repo


def read_config(path: Path):
    pytest.importorskip("torch")
    from google.protobuf import text_format

    from tests.test_export import model_config_class

    return text_format.Parse(path.read_text(), model_config_class()())


def test_our_names_are_the_triton_repository_names(catalog, triton_repository):
    pytest.importorskip("torch")
    from toolkit.export.triton import model_name

    folders = sorted(p.name for p in triton_repository.iterdir())
    assert folders == sorted(triton_name(m.classifier.metadata) for m in catalog.models.values())
    for meta in ({"dataset": "stl10", "model": "net"}, {"dataset": "my data", "model": "r.v2"}):
        assert triton_name(meta) == model_name(meta)
    # A converted model is another model beside its fp32 one: its own name.
    int8 = {"dataset": "cifar10", "model": "speedrun", "precision": "int8"}
    assert model_name(int8) == "cifar10_speedrun_int8"


def test_v2_metadata_agrees_with_the_exported_config_pbtxt(client, catalog, triton_repository):
    """The same client script must run against Triton serving this repository: every name,
    datatype and dim it reads from our metadata must be what Triton reads from config.pbtxt."""
    for folder in sorted(triton_repository.iterdir()):
        config = read_config(folder / "config.pbtxt")
        tensor_fields = type(config).DESCRIPTOR.fields_by_name["input"].message_type
        data_type = tensor_fields.fields_by_name["data_type"].enum_type.values_by_number
        meta = client.get_model_metadata(config.name)
        ours = client.get_model_config(config.name)
        assert config.max_batch_size == ours["max_batch_size"] == MAX_BATCH_SIZE
        assert meta["parameters"]["max_batch_size"] == config.max_batch_size
        assert config.platform == meta["platform"] == ours["platform"]
        for theirs, mine, my_config in (
            (config.input, meta["inputs"], ours["input"]),
            (config.output, meta["outputs"], ours["output"]),
        ):
            assert [t.name for t in theirs] == [m["name"] for m in mine]
            for t, m, c in zip(theirs, mine, my_config, strict=True):
                # max_batch_size > 0: Triton's dims leave out the batch, which is -1 for us.
                assert [-1, *t.dims] == m["shape"] and list(t.dims) == c["dims"]
                assert data_type[t.data_type].name == f"TYPE_{m['datatype']}" == c["data_type"]
        labels = (folder / config.output[1].label_filename).read_text().splitlines()
        assert labels == meta["parameters"]["classes"]
        # The script above, pointed at the repository's model name, answers as by our key.
        examples = catalog.examples["cifar10"]
        key = meta["parameters"]["names"][0]
        assert key in catalog.models and key != config.name
        assert top1_with(client, config.name, examples) == top1_with(client, key, examples)


# --- the example manifests -------------------------------------------------------------------


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def test_the_kserve_manifest_serves_the_triton_repository_over_v2():
    (service,) = manifests("kserve-triton.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["storageUri"].endswith("/triton")  # the --triton folder, as its comment says
    assert model["runtime"] == "kserve-tritonserver"


def test_the_deployment_manifest_probes_routes_the_server_answers(server):
    import httpx

    deployment, service = manifests("toolkit-serve.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == 7860  # the Dockerfile's EXPOSE and CMD
    assert "EXPOSE 7860" in (ROOT / "Dockerfile").read_text()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    for probe in ("readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert container[probe]["httpGet"]["port"] == port["name"]
        answer = httpx.get(server.rstrip("/") + path, timeout=TIMEOUT)
        assert answer.status_code == 200, path
        assert json.loads(answer.text)
    env = {e["name"] for e in container["env"]}
    assert env == {"TOOLKIT_AUTH"}


# --- the docs' client code ---------------------------------------------------------------------


def docs_blocks(section: str) -> list[str]:
    """The ```python blocks of a section of the inference API's page, in order."""
    text = (ROOT / "docs" / "serving" / "api.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def test_the_docs_client_code_runs_as_written(server, capsys, monkeypatch, tmp_path):
    """tritonclient's block, then plain httpx's (which reuses its `batch`), on a real cat."""
    shutil.copy(ARTIFACTS / "examples" / "cifar10" / "cat_0.png", tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    address = server.removeprefix("http://").rstrip("/")
    tritonclient_code, httpx_code = docs_blocks("Calling it from code")
    namespace: dict = {}
    exec(tritonclient_code.replace("127.0.0.1:7860", address), namespace)
    assert "b'0.968786:3:cat'" in capsys.readouterr().out  # what the docs say it prints
    exec(httpx_code.replace("127.0.0.1:7860", address), namespace)
    assert capsys.readouterr().out.startswith("cat [{'label': 'cat'")
    assert len(namespace["probs"]) == 10 and max(namespace["probs"]) > 0.9
