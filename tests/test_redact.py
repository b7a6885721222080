"""Credentials in URLs wherever a user can put one: found by parsing, never printed, never turned into a local path."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetrack.cli import main
from finetrack.redact import has_credentials, looks_like_url, redact

SECRET_PARTS = ("Zq9w", "Kx4m", "Pw7t")


@pytest.mark.parametrize("password", ["Zq9w@Kx4m/Pw7t", "Zq9w#Kx4m?Pw7t", "Zq9w;Kx4m)Pw7t", "Zq9w,Kx4m]Pw7t", "Zq9w#Kx4m"])
def test_passwords_with_url_punctuation_are_found(password):
    url = f"s3://AKIAUSER:{password}@bucket/run/x.jsonl"
    assert has_credentials(url)
    for text in (url, f"error: data path {url}: not found", f"(see {url})", str(Path(url))):  # Path() leaves 's3:/...'
        shown = redact(text)
        assert not any(part in shown for part in SECRET_PARTS), shown
        assert "bucket/run" in shown and "AKIAUSER" not in shown


def test_what_is_not_a_url_is_left_alone():
    assert not looks_like_url("runs/x") and not looks_like_url("C:/Users/x") and not looks_like_url("/tmp/a@b")
    assert looks_like_url("s3://b/x") and looks_like_url(str(Path("s3://b/x")))
    for text in ("hf://datasets/org/repo@main/f.jsonl", "file:///tmp/a@b", "C:/Users/me", "https://github.com/org/repo"):
        assert redact(text) == text


@pytest.mark.parametrize(
    "argv, said",
    [
        (["sync", "runs/x", "s3://AKIAUSER:Zq9w@Kx4m/Pw7t@bucket/run"], "DST is a URL; sync mirrors into a local folder"),
        (["train", "output.dir=s3://AKIAUSER:Zq9w@Kx4m/Pw7t@bucket/run"], "output.dir is a local folder"),
        (["plan", "output.dir=s3://AKIAUSER:Zq9w@Kx4m/Pw7t@bucket/run"], "output.dir is a local folder"),
        (["eval", "s3://AKIAUSER:Zq9w@Kx4m/Pw7t@bucket/run"], "no such run directory"),
        (["report", "s3://AKIAUSER:Zq9w@Kx4m/Pw7t@bucket/run"], "no such run directory"),
        (["sync", "s3://AKIAUSER:Zq9w#Kx4m@bucket/run", "dst"], "put no credentials in the URL"),
        # a presigned URL's secret lives in its query string
        (["sync", "s3://bucket/run?X-Amz-Signature=Zq9wKx4mPw7t", "dst"], "a query string is no part of a storage location"),
        (["sync", "memory://run?token=Zq9wKx4mPw7t", "dst"], "a query string is no part of a storage location"),
        (["train", "checkpoint.remote=file:///tmp/remote?token=Zq9wKx4mPw7t"], "a query string is no part of a storage location"),
    ],
)
def test_a_url_where_a_local_folder_belongs_is_refused_without_its_password(argv, said, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert not any(part in err for part in SECRET_PARTS), err
    assert not any(tmp_path.iterdir()), "nothing may be created, least of all a folder named after the URL"


def test_a_judge_base_url_with_credentials_is_refused_without_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    judge = "{kind: openai, model: m, base_url: 'https://AKIAUSER:Zq9wKx4mPw7t@judge.example/v1'}"
    assert main(["plan", f"eval.suites=[{{name: j, kind: judge, questions: q.yaml, judges: [{judge}]}}]"]) == 2
    err = capsys.readouterr().err
    assert "put no credentials in the URL" in err and "api_key_env" in err and err.count("error:") == 1, err
    assert not any(part in err for part in SECRET_PARTS), err
