"""The container images' user, for deploy/container/container.py, which builds and checks the
images, and for tests/test_deploy.py, which checks that the Kubernetes and KServe manifests run
them as that user."""

# `bentoml containerize` creates the images' user, `bentoml`, with this uid and gid (BentoML
# 1.4.39: BENTO_UID_GID in bentoml/_internal/container/generate.py), and the images name it by
# number in USER. Kubernetes needs the number: with `runAsNonRoot: true` the kubelet refuses an
# image whose USER is a name ("cannot verify user is non-root"). The manifests set it in
# runAsUser, runAsGroup and fsGroup.
IMAGE_UID_GID = 1034
