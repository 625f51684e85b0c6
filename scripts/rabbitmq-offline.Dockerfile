# RabbitMQ for machines with no container registry: built by scripts/docker-engine.sh from a Debian
# base made with debootstrap, with the machine's own apt sources (its mirror is the one network it has).
# Debian's rabbitmq-server is 3.10, the version the local-node path runs, so both paths test one broker.
ARG BASE=local/debian:bookworm
FROM ${BASE}
COPY apt/ /etc/apt/
# No init runs during the build: without this policy the package's postinst tries to start the service.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_prometheus
EXPOSE 5672 5671 15672
# Not Debian's /usr/sbin wrapper: it switches user with su, which does not pass docker stop's SIGTERM
# on, so every stop waited out its timeout and ended in SIGKILL. This script stops the node on SIGTERM.
USER rabbitmq
ENV HOME=/var/lib/rabbitmq
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
