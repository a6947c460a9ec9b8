"""python -m runtime.serve: a real local Ray Serve app on 127.0.0.1 serving the demo
bundle (ort-cpu, fp32), spoken to by the real `openai` and `webuiapi` client packages.

Batching never changes a picture: images served concurrently (one UNet batch) equal the
same requests served alone, pixel for pixel. Overload gives 503s, not timeouts."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from benchmarks.serve import free_port  # noqa: E402
from runtime.serve.app import build  # noqa: E402

MAX_BATCH, MAX_QUEUED = 4, 6
SMALL = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA folder with one random PEFT-layout LoRA for the demo UNet (numpy only)."""
    from benchmarks.lora_swap import random_lora
    from runtime.bundle import demo_bundle

    folder = tmp_path_factory.mktemp("loras")
    random_lora(demo_bundle(), folder / "style.safetensors", rank=8, seed=3)
    return folder


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory):
    """An embeddings folder with one A1111-format embedding: the word `shiny`, 2 vectors."""
    from safetensors.numpy import save_file

    from runtime.bundle import demo_bundle, read_manifest

    folder = tmp_path_factory.mktemp("embeddings")
    width = read_manifest(demo_bundle()).hidden
    vectors = np.random.default_rng(2).standard_normal((2, width), np.float32)
    save_file({"emb_params": vectors}, str(folder / "shiny.safetensors"))
    return folder


@pytest.fixture(scope="module")
def server(lora_dir):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": "demo", "backend": "ort-cpu", "max_batch": MAX_BATCH,
                         "batch_wait_ms": 300, "max_queued": MAX_QUEUED,
                         "lora_dir": str(lora_dir)}),
                  name="sdrt", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def png(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image)


def txt2img(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/txt2img", json={**SMALL, **body}, timeout=120)


def test_openai_client_gets_pngs(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    r = client.images.generate(model="demo", prompt="a red circle", n=2, size="64x64",
                               response_format="b64_json", extra_body={"steps": 3, "seed": 5})
    images = [png(d.b64_json) for d in r.data]
    assert len(images) == 2 and images[0].shape == (64, 64, 3)
    assert not np.array_equal(images[0], images[1])  # seeds 5 and 6
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_webuiapi_client_gets_pngs_and_seeds(server):
    webuiapi = pytest.importorskip("webuiapi")
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)
    r = api.txt2img(prompt="a blue square", width=64, height=64, seed=3, batch_size=2)
    assert len(r.images) == 2 and r.images[0].size == (64, 64)
    assert r.info["all_seeds"] == [3, 4] and r.info["sampler_name"] == "Euler a"
    assert "Seed: 4," in r.info["infotexts"][1]
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    assert api.get_sd_models()[0]["model_name"] == "demo"


def test_batched_images_equal_each_served_alone(server):
    jobs = [("a red circle", 11), ("a blue square", 12), ("a green star", 13), ("a cat", 14)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: one UNet batch (or two)
        together = list(pool.map(lambda j: txt2img(server, prompt=j[0], seed=j[1]), jobs))
    alone = [txt2img(server, prompt=p, seed=s) for p, s in jobs]  # one at a time: batch 1
    batches = [json.loads(r.json()["info"])["batch_sizes"][0] for r in together]
    assert max(batches) > 1, f"the concurrent requests were not batched: {batches}"
    assert [json.loads(r.json()["info"])["batch_sizes"][0] for r in alone] == [1] * len(jobs)
    for (prompt, _), a, b in zip(jobs, together, alone, strict=True):
        assert np.array_equal(png(a.json()["images"][0]), png(b.json()["images"][0])), prompt


def test_a_long_prompt_in_the_batch_changes_no_other_picture(server):
    """A call pads every prompt to its longest one's 77-token chunks: jobs are grouped by
    text length too, so a short prompt beside a 3-chunk one stays itself."""
    long = ", ".join(["a very detailed red circle on a plain blue background"] * 12)
    jobs = [("a dog", "", 1), (long, "", 2), ("a cat", long, 3)]

    def one(job):
        return txt2img(server, prompt=job[0], negative_prompt=job[1], seed=job[2])

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    for job, r in zip(jobs, together, strict=True):
        assert np.array_equal(png(r.json()["images"][0]), png(one(job).json()["images"][0])), job


@pytest.mark.parametrize("body,status,says", [
    ({"sampler_name": "Heun"}, 400, "sampler 'Heun' is not supported"),
    ({"width": 65}, 400, "width must be a multiple of 8"),
    ({"enable_hr": True}, 400, "hires fix is not supported"),
    ({"batch_size": 17}, 400, "17 images per request"),
    ({"steps": "many"}, 422, "steps: "),
    ({"prompt": "(a:1.2.3)"}, 400, "prompt syntax"),
    ({"batch_size": -2, "n_iter": -2}, 422, "batch_size: "),
    ({"sampler_name": "Euler", "scheduler": "Karras"}, 400, "Karras schedule is supported with DPM++"),
    ({"sampler_name": "Euler a", "eta": 0.5}, 400, "eta 0.5 is not supported with this sampler"),
    ({"sampler_name": "DDIM", "eta": 1.0}, 400, "eta 1 is not supported with this sampler (it runs 0)"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, 400, "setting CLIP_stop_at_last_layers=2"),
    ({"refiner_checkpoint": "sdxl_refiner"}, 400, "refiners is not supported"),
    ({"init_images": ["abc"]}, 400, "this route is txt2img"),
    ({"width": 2048}, 400, "more than this server's 1024 px"),
    ({"steps": 151}, 400, "more than this server's 150"),
])
def test_bad_a1111_requests_get_one_line(server, body, status, says):
    r = txt2img(server, **body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert says in detail and "\n" not in detail


def test_settings_a_client_repeats_are_accepted(server):
    """override_settings that equal what GET /options reports, eta where the sampler
    ignores it, A1111's seed_resize -1: no effect, so no refusal."""
    r = txt2img(server, override_settings={"CLIP_stop_at_last_layers": 1,
                                           "sd_model_checkpoint": "demo"},
                sampler_name="DPM++ 2M", eta=0.3, seed_resize_from_h=-1)
    assert r.status_code == 200, r.text


def test_posted_options_that_change_nothing_pass(server):
    ok = requests.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": "demo"}, timeout=30)
    other = requests.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": "sd15"}, timeout=30)
    assert ok.status_code == 200 and other.status_code == 400
    assert "setting sd_model_checkpoint='sd15' is not supported" in other.json()["detail"]


def test_bad_openai_request_is_an_openai_error(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="response_format 'url' is not supported"):
        client.images.generate(prompt="x", size="64x64", response_format="url")
    # a client's default model name gets this server's one model (GET /v1/models says which)
    r = client.images.generate(model="dall-e-2", prompt="x", size="64x64", response_format="b64_json",
                               extra_body={"steps": 2})
    assert png(r.data[0].b64_json).shape == (64, 64, 3)


def test_sampler_aliases_and_karras_map_to_our_schedulers():
    from runtime.serve.api import A1111_ALIASES, scheduler_for

    for ours, aliases in A1111_ALIASES.items():
        for alias in aliases:  # every alias GET /sdapi/v1/samplers lists is accepted
            assert scheduler_for(alias) == ours
    assert scheduler_for("DPM++ 2M", "Karras") == "dpmpp_2m_karras"
    assert scheduler_for("DPM++ 2M", "Automatic") == "dpmpp_2m"
    assert scheduler_for("Euler a") == "euler_a" and scheduler_for("PLMS") == "pndm"


def test_health_and_metrics(server):
    assert txt2img(server, prompt="counted", seed=1).status_code == 200
    assert requests.get(f"{server}/health", timeout=30).json()["status"] == "ok"
    text = requests.get(f"{server}/metrics", timeout=30).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values['sdrt_requests_total{route="/sdapi/v1/txt2img",status="200"}'] >= 1
    for counted in ("sdrt_batch_size_count", 'sdrt_stage_seconds_count{stage="denoise"}',
                    'sdrt_request_seconds_count{route="/sdapi/v1/txt2img"}', "sdrt_images_total"):
        assert values[counted] >= 1, counted
    assert "sdrt_queue_depth" in values
    requests.get(f"{server}/no/such/path/123", timeout=30)  # no new label per path
    assert "/no/such" not in requests.get(f"{server}/metrics", timeout=30).text


def test_a_client_that_disconnects_leaves_no_work_behind(server):
    """Its images that have not started are dropped: the replica makes only the others."""
    def made() -> int:
        return requests.get(f"{server}/sdrt/v1/replica", timeout=60).json()["made"]

    before = made()
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(txt2img, server, prompt="busy", seed=1, steps=30, batch_size=MAX_BATCH,
                           width=256, height=256)  # a few seconds
        time.sleep(0.8)  # the busy batch runs; the next request waits behind it
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{server}/sdapi/v1/txt2img", json={**SMALL, "prompt": "gone",
                          "batch_size": 2}, timeout=0.5)
        assert busy.result(timeout=120).status_code == 200
    time.sleep(2.0)  # time for a leaked batch to run, if there were one
    assert made() - before == MAX_BATCH


def test_overload_gets_503_with_retry_after_not_a_timeout(server):
    n = 2 * MAX_BATCH + MAX_QUEUED + 10  # past what runs, waits to run and queues
    with ThreadPoolExecutor(n) as pool:
        rs = list(pool.map(lambda k: txt2img(server, prompt="x", seed=k, steps=8), range(n)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= MAX_BATCH, codes
    busy = next(r for r in rs if r.status_code == 503)
    assert int(busy.headers["Retry-After"]) >= 1 and "server busy" in busy.json()["detail"]


def test_serve_cli_refuses_bad_settings_in_one_line(tmp_path):
    from safetensors.numpy import save_file

    from runtime.bundle import demo_bundle, read_manifest

    (tmp_path / "emb").mkdir()
    save_file({"<wide>": np.zeros(5, np.float32)}, str(tmp_path / "emb" / "wide.safetensors"))
    (tmp_path / "word").mkdir()  # the vocabulary has "photo": refused before Ray starts
    save_file({"photo": np.zeros(read_manifest(demo_bundle()).hidden, np.float32)},
              str(tmp_path / "word" / "photo.safetensors"))
    for argv, says in ((["--model", str(tmp_path)], "manifest"),
                       (["--embeddings-dir", str(tmp_path / "none")], "is not a folder"),
                       (["--embeddings-dir", str(tmp_path / "emb")], "another model"),
                       (["--embeddings-dir", str(tmp_path / "word")], "vocabulary already"),
                       (["--replicas", "0"], "replicas must be"),
                       (["--port", "70000"], "port must be")):
        out = subprocess.run([sys.executable, "-m", "runtime.serve", *argv],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], out.stderr


def test_the_runtime_core_does_not_import_ray():
    code = ("import sys, runtime.pipeline, runtime.generate, runtime.serve.jobs, "
            "runtime.serve.api; assert 'ray' not in sys.modules, 'ray imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]


def test_a_killed_replica_is_replaced_and_requests_get_answers(server):
    """Every request gets an answer (an image or an error status, never a hang) while
    the generator replica dies; Serve starts a new one and serving goes on."""
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(txt2img, server, prompt="x", seed=k, steps=20) for k in range(4)]
        time.sleep(0.5)
        victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "Generator" in a["name"]]
        assert victims, "no generator replica found"
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]))
        answers = [f.result(timeout=120) for f in futures]
    for r in answers:  # an image, or an error in A1111's shape with one line
        assert r.status_code == 200 or (r.status_code >= 500 and "\n" not in r.json()["detail"]), r.text
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if requests.get(f"{server}/health", timeout=30).status_code == 200:
            break
        time.sleep(1)
    assert txt2img(server, prompt="after", seed=1).status_code == 200


def test_the_deploy_configs_are_valid_serve_configs():
    """serve_config.yaml (serve deploy) and the KubeRay RayService's serveConfigV2 parse
    as Ray Serve deploy configs whose args are exactly our Settings fields."""
    import dataclasses
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from runtime.serve.app import Settings

    folder = Path(__file__).parent.parent / "runtime" / "serve"
    kuberay = yaml.safe_load((folder / "kuberay_rayservice.yaml").read_text())
    for config in (yaml.safe_load((folder / "serve_config.yaml").read_text()),
                   yaml.safe_load(kuberay["spec"]["serveConfigV2"])):
        app = ServeDeploySchema.model_validate(config).applications[0]
        assert app.import_path == "runtime.serve.app:build"
        assert set(app.args) <= {f.name for f in dataclasses.fields(Settings)}
        Settings(**app.args)



def test_the_readme_serve_command_serves_and_stops_cleanly():
    """python -m runtime.serve as a user runs it: it says where it serves, answers the
    openai client, and stops on SIGTERM with exit 0 (Ray shut down with it)."""
    import signal

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", "demo",
                             "--backend", "ort-cpu", "--port", str(port)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        started = threading.Event()

        def watch() -> None:  # the replicas' load lines, then "serving ..."
            for line in proc.stderr:
                if line.startswith("serving demo on"):
                    started.set()

        threading.Thread(target=watch, daemon=True).start()
        assert started.wait(timeout=180), "the server did not say it was serving"
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        r = client.images.generate(prompt="a red apple", size="64x64",
                                   response_format="b64_json", extra_body={"steps": 2, "seed": 1})
        assert png(r.data[0].b64_json).shape == (64, 64, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lora_tags_in_prompts_run_that_lora_and_batch_apart(server, lora_dir):
    """<lora:style:40> as A1111 takes it: the image equals our Pipeline's with that LoRA set
    (tags out of the prompt), and requests with other LoRAs in the same moment are
    batched apart, each still its own picture."""
    from runtime.bundle import demo_bundle
    from runtime.pipeline import Pipeline

    with Pipeline(demo_bundle(), "ort-cpu") as pipe:
        plain = pipe("a red circle", seed=5, scheduler="euler", guidance_scale=7.0, **SMALL).images[0]
        pipe.set_loras([(lora_dir / "style.safetensors", 40.0)])
        styled = pipe("a red circle", seed=5, scheduler="euler", guidance_scale=7.0, **SMALL).images[0]
    assert np.abs(styled.astype(int) - plain).max() > 10  # the LoRA does something
    prompts = ["a red circle <lora:style:40>", "a red circle", "<lora:style:40> a red circle"]
    with ThreadPoolExecutor(3) as pool:
        rs = list(pool.map(lambda p: txt2img(server, prompt=p, seed=5), prompts))
    got = [png(r.json()["images"][0]) for r in rs]
    assert np.array_equal(got[0], styled) and np.array_equal(got[2], styled)
    assert np.array_equal(got[1], plain)
    assert "a red circle <lora:style:40>\n" in json.loads(rs[0].json()["info"])["infotexts"][0]
    names = [x["name"] for x in requests.get(f"{server}/sdapi/v1/loras", timeout=30).json()]
    assert names == ["style"]


def test_a_replica_loads_the_embeddings_folder(lora_dir, embeddings_dir):
    """A generator replica (its class without Ray) loads the folder at start: `shiny` in
    a prompt, beside a LoRA tag, gives our Pipeline's image with both; A1111's listing
    has it. (The shared server runs without: a LoRA-ready text encoder need not equal
    the bundle's engine bit for bit, which the other tests compare with.)"""
    from runtime.bundle import demo_bundle
    from runtime.pipeline import Pipeline
    from runtime.serve.app import Generator, Settings, embeddings_listing
    from runtime.serve.jobs import Job, run_jobs

    settings = {"model": "demo", "lora_dir": str(lora_dir), "embeddings_dir": str(embeddings_dir)}
    Settings(**settings).check()
    assert embeddings_listing(Settings(**settings))["loaded"]["shiny"]["vectors"] == 2
    kw = {"seed": 5, "scheduler": "euler", "guidance_scale": 7.0, **SMALL}
    with Pipeline(demo_bundle(), "ort-cpu") as pipe:
        plain = pipe("a shiny red circle", **kw).images[0]
        pipe.set_embeddings([embeddings_dir / "shiny.safetensors"])
        shiny = pipe("a shiny red circle", **kw).images[0]
        pipe.set_loras([(lora_dir / "style.safetensors", 40.0)])
        both = pipe("a shiny red circle", **kw).images[0]
    assert np.abs(shiny.astype(int) - plain).max() > 10  # the word is the embedding's now
    gen = Generator.func_or_class(settings)  # the replica's __init__
    try:
        assert gen.pipe.backend == "ort-cpu"
        assert [e.token for e in gen.pipe.embeddings] == ["shiny"]
        jobs = [Job("a shiny red circle", "", 3, "euler", 7.0, 64, 64, 5),
                Job("a shiny red circle", "", 3, "euler", 7.0, 64, 64, 5, loras=(("style", 40.0),))]
        made = run_jobs(gen.pipe, jobs, "demo", lora_dir)
    finally:
        gen.pipe.close()
    assert [m.error for m in made] == [None, None]
    got = [np.asarray(Image.open(io.BytesIO(m.png))) for m in made]
    assert np.array_equal(got[0], shiny) and np.array_equal(got[1], both)


@pytest.mark.parametrize("prompt,says", [
    ("x <lora:nothere:1>", "LoRA 'nothere' is not in the server's LoRA folder"),
    ("x <lora:../style:1>", "must be a file name in the LoRA folder"),
    ("x <lora:style:1:0.5>", "only <lora:name> and <lora:name:scale>"),
    ("x <lora:style:big>", "is not a number"),
])
def test_bad_lora_tags_get_one_line(server, prompt, says):
    r = txt2img(server, prompt=prompt)
    assert r.status_code == 400 and says in r.json()["detail"], r.text


def test_img2img_as_webuiapi_sends_it_equals_our_pipeline(server):
    """POST /sdapi/v1/img2img: the init image resized to width x height, at
    denoising_strength; the same picture as our Pipeline's img2img with that seed, and
    two requests with different images at once each get their own."""
    webuiapi = pytest.importorskip("webuiapi")
    from runtime.bundle import demo_bundle
    from runtime.pipeline import Pipeline

    rs = np.random.RandomState(0)
    pictures = [Image.fromarray((rs.rand(80, 96, 3) * 255).astype(np.uint8)) for _ in range(2)]
    kw = dict(steps=4, scheduler="euler_a", guidance_scale=7.0, height=64, width=64, strength=0.6)
    with Pipeline(demo_bundle(), "ort-cpu") as pipe:
        want = [pipe("a boat", image=p, seed=9, **kw).images[0] for p in pictures]
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)

    def one(picture):
        return api.img2img(images=[picture], prompt="a boat", seed=9, denoising_strength=0.6,
                           width=64, height=64, cfg_scale=7.0)

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(one, pictures))
    for r, w in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(r.images[0]), w)
        assert r.info["denoising_strength"] == 0.6 and "Denoising strength: 0.6" in r.info["infotexts"][0]
    assert got[0].parameters["init_images"] is None  # as A1111: not sent back
    # one image, two seeds: one UNet batch, each image its seed's own
    both = api.img2img(images=[pictures[0]], prompt="a boat", seed=9, denoising_strength=0.6,
                       width=64, height=64, cfg_scale=7.0, batch_size=2)
    assert both.info["batch_sizes"] == [2, 2] and both.info["all_seeds"] == [9, 10]
    with Pipeline(demo_bundle(), "ort-cpu") as pipe:
        tenth = pipe("a boat", image=pictures[0], seed=10, **kw).images[0]
    assert np.array_equal(np.asarray(both.images[0]), want[0])
    assert np.array_equal(np.asarray(both.images[1]), tenth)


@pytest.mark.parametrize("body,says", [
    ({"init_images": []}, "give one image, got 0"),
    ({"init_images": ["not base64!"]}, "not base64"),
    ({"init_images": [base64.b64encode(b"not an image").decode()]}, "not an image format"),
    ({"mask": "x"}, "inpainting is not served yet"),
    ({"denoising_strength": 0}, "denoising_strength must be in (0, 1]"),
    ({"resize_mode": 2}, "resize_mode 2 is not supported"),
    ({"init_images": ["A" * (44 << 20)]}, "init_images: more than 32 MiB"),
])
def test_bad_img2img_requests_get_one_line(server, body, says):
    picture = io.BytesIO()
    Image.new("RGB", (64, 64)).save(picture, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    full = {**SMALL, "init_images": [data_url], **body}
    r = requests.post(f"{server}/sdapi/v1/img2img", json=full, timeout=120)
    assert r.status_code == 400 and says in r.json()["detail"], r.text


def test_a_body_too_large_is_refused_before_it_is_read(server):
    import http.client

    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/sdapi/v1/img2img")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(1 << 30))  # announced, never sent
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "at most 48 MiB" in json.loads(r.read())["detail"]
    conn.close()


def test_img2img_takes_base64_with_line_breaks(server):
    """A1111 decodes base64 as Python's b64decode does: line-wrapped text too."""
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, format="PNG")
    body = {**SMALL, "init_images": [base64.encodebytes(picture.getvalue()).decode()]}
    assert requests.post(f"{server}/sdapi/v1/img2img", json=body, timeout=120).status_code == 200
