"""Engines that tag a catalog beyond one process: ``ray_engine`` (Ray Data actors on a local Ray or a cluster).
The local engine is ``xmctag.tagger.Tagger.tag_file``."""
