"""The deployment files: Kubernetes manifests, KServe, the Dockerfile (through tools/deploy_lint.py)."""
