# Cluster targets (included by the Makefile); docs/kind.md walks through them:
#   make kind-up images kind-load upload-data submit     ...     make kind-down
# Each runs the script of the same name in scripts/; settings pass through as make or environment variables:
#   CLUSTER_NAME (d2mtl)  GPU (0; 1: nvkind GPU worker + CUDA image)  IMAGES, KIND_IMAGES (which images)
#   REGISTRY (ghcr.io/distill-2md-mtl)  VERSION (pyproject's)  PUSH (1: push after building)
#   NAMESPACE (kubeflow)  BUCKET (d2mtl)  KUBE_CONTEXT (kind-$CLUSTER_NAME)  SUBMIT_ARGS (extra d2mtl submit flags)

export CLUSTER_NAME GPU IMAGES KIND_IMAGES REGISTRY VERSION PUSH NAMESPACE BUCKET KUBE_CONTEXT

.PHONY: kind-up images kind-load upload-data submit kind-down lock-images

kind-up:
	scripts/kind-up

images:
	scripts/images

kind-load:
	scripts/kind-load

upload-data: venv
	D2MTL=$(BIN)/d2mtl DATA_ROOT=$(DATA_ROOT) scripts/upload-data

submit: venv
	D2MTL=$(BIN)/d2mtl $(if $(filter-out file,$(origin CONFIG)),CONFIG=$(CONFIG)) scripts/submit $(SUBMIT_ARGS)

kind-down:
	scripts/kind-down

# Re-resolve docker/requirements/*.txt after a dependency change in pyproject.toml.
lock-images: venv
	$(BIN)/pip install --quiet uv==0.13.9
	$(BIN)/python docker/lock.py
