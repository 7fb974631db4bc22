# Herald in a container: the test suite and the demo, on the Python the project supports.
#
#   docker build -t herald .
#   docker run --rm herald                                            # herald demo (the default command)
#   docker run --rm herald pytest -q -p no:cacheprovider              # the test suite
#   docker run --rm -p 127.0.0.1:2575:2575 -p 127.0.0.1:9102:9102 -v herald-data:/var/lib/herald \
#       -v /etc/herald:/etc/herald:ro herald herald serve --config /etc/herald/herald.toml
#
# In a container the health listener must bind the container's address for -p to reach it:
# [health] listen = "tcp:9102:interface=0.0.0.0" (publish it on the host's loopback only, as above).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# openssl: the Direct (S/MIME) tests check a signature with the openssl command, as a receiving HISP would.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssl \
    && rm -rf /var/lib/apt/lists/*

# A dedicated user; the data folder is its own.
RUN useradd --system --create-home --home-dir /home/herald --uid 10001 herald \
    && install -d -m 0700 -o herald -g herald /var/lib/herald

WORKDIR /opt/herald

# What the package is made of first (a layer that changes only with the code), installed with the test extras.
COPY setup.cfg pyproject.toml README.md ./
COPY mllp ./mllp
COPY gateway ./gateway
COPY mappings ./mappings
COPY sample_messages ./sample_messages
RUN pip install -e '.[test]'

# Then the rest the tests read (tests/, docs/, bench/, deploy/, the example config); .dockerignore keeps
# out the virtualenv, the git history, data folders and any TLS key.
COPY . .
RUN chown -R herald:herald /opt/herald

USER herald
EXPOSE 2575 9102
CMD ["herald", "demo"]
