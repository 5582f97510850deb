"""Media pipeline steps: submit to a microservice, then poll it through timers, then report."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from orchestrator.engine import Done, Poll, StepContext
from sagas.media import DOWNLOAD_TASK, NORMALIZE_TASK, TRANSCRIBE_TASK
from sagas.media.settings import MediaSettings
from orchestrator.steps import StepError, step_task

if TYPE_CHECKING:
    from sagas.media.http_client import ServiceClient

NORMALIZATION_OPTIONS = ("remove_noise", "convert_to_mono", "apply_highpass_filter",
                         "set_sample_rate_16k", "isolate_vocals")


def client(ctx: StepContext, service: str) -> ServiceClient:
    # Imported on first use: `requests` costs every worker process memory, also those that
    # never run a media step.
    from sagas.media.http_client import ServiceClient

    s = MediaSettings.from_settings(ctx.settings)
    return ServiceClient(service, s.service_url(service), s.service_timeout(service))


def submit_once(ctx: StepContext, service: ServiceClient, **request: object) -> str:
    """Submit the stage's job unless this run already did; the key makes a re-submit a no-op."""
    remote = ctx.data.get("remote_job_id")
    if remote is None:
        headers = {"Idempotency-Key": ctx.idempotency_key}
        job = service.json("POST", "/jobs", headers=headers, **request)
        remote = job["job_id"]
        ctx.save(remote_job_id=remote)
    return str(remote)


def poll(ctx: StepContext, service: ServiceClient, remote: str, done: Callable[[], Done]) -> Done | Poll:
    status = service.json("GET", f"/jobs/{remote}")
    state = status.get("status")
    if state == "completed":
        return done()
    if state == "failed":
        raise StepError(f"{service.name} job {remote} failed: {status.get('error') or 'no reason given'}")
    media = MediaSettings.from_settings(ctx.settings)
    limit = media.max_poll_attempts
    if ctx.polls + 1 >= limit:
        raise StepError(f"{service.name} job {remote} not finished after {limit} polls")
    return Poll(after=media.poll_interval, progress=float(status.get("progress") or 0.0))


def fetch_file(service: ServiceClient, remote: str) -> tuple[bytes, str]:
    resp = service.request("GET", f"/jobs/{remote}/download")
    disposition = resp.headers.get("Content-Disposition", "")
    filename = disposition.split("filename=")[-1].strip('"; ') if "filename=" in disposition else f"{remote}.webm"
    return resp.content, filename


@step_task(DOWNLOAD_TASK)
def download(ctx: StepContext) -> Done | Poll:
    downloader = client(ctx, "video-downloader")
    remote = submit_once(ctx, downloader, json={"url": ctx.input["youtube_url"]})
    return poll(ctx, downloader, remote, lambda: Done("downloaded", {"remote_job_id": remote}))


@step_task(NORMALIZE_TASK)
def normalize(ctx: StepContext) -> Done | Poll:
    normalizer = client(ctx, "audio-normalization")
    if ctx.data.get("remote_job_id") is None:
        audio, filename = fetch_file(client(ctx, "video-downloader"), ctx.outputs["download"]["remote_job_id"])
        form = {name: str(bool(ctx.input[name])).lower() for name in NORMALIZATION_OPTIONS}
        remote = submit_once(ctx, normalizer, files={"file": (filename, audio)}, data=form)
    else:
        remote = ctx.data["remote_job_id"]

    def done() -> Done:
        return Done("normalized", {"remote_job_id": remote, "audio_file": "audio_normalized.webm"})

    return poll(ctx, normalizer, remote, done)


@step_task(TRANSCRIBE_TASK)
def transcribe(ctx: StepContext) -> Done | Poll:
    transcriber = client(ctx, "audio-transcriber")
    if ctx.data.get("remote_job_id") is None:
        audio, filename = fetch_file(client(ctx, "audio-normalization"),
                                     ctx.outputs["normalization"]["remote_job_id"])
        form = {"language": ctx.input["language"]}
        if ctx.input.get("language_out"):
            form["language_out"] = ctx.input["language_out"]
        remote = submit_once(ctx, transcriber, files={"file": (filename, audio)}, data=form)
    else:
        remote = ctx.data["remote_job_id"]

    def done() -> Done:
        result = transcriber.json("GET", f"/jobs/{remote}/transcription")
        if not isinstance(result, dict) or not isinstance(result.get("text"), str):
            raise StepError(f"audio-transcriber job {remote} returned no text")
        return Done("transcribed", {
            "remote_job_id": remote,
            "text": result["text"],
            "segments": result.get("segments") or [],
            "language": result.get("language"),
            "transcription_file": result.get("transcription_file") or "transcription.srt",
        })

    return poll(ctx, transcriber, remote, done)
