#!/bin/sh
# Entrypoint of the roar image: runs the container's command in the project
# environment, so `docker run --rm roar task --list` and
# `docker compose run --rm roar task train-cls` reach the Taskfile; with no
# arguments the image's CMD (bash) starts. The package and its console scripts
# (task, roar, hadolint) are installed into the image's Python, already on PATH.
set -e
exec "$@"
