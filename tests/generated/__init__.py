"""Generated test data, in one place: plain functions without pytest, so that the bench/ scripts' ``--smoke``
runs use the same data (they put tests/ on sys.path; the tests never import bench/).

- ``layouts``: tiny datasets in the real on-disk layouts the ingest adapters read;
- ``tables``: ingest output (face table + label table) written directly, for the stages after ingest;
- ``images``: odd and hostile image files for the decoders;
- ``faces``: a drawn face the RetinaFace detector finds.
"""
