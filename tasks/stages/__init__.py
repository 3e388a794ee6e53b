"""The pipeline's stages: each module is one `dvc.yaml` stage (`python -m tasks.stages.<name>`), a
pure function plus a thin `main()`. A stage never imports another stage.
"""
