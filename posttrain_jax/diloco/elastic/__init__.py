"""Elastic Streaming DiLoCo: one JAX job per slice, membership by a quorum service.

  membership  torchft's Lighthouse: heartbeats, per-sync quorums (min_replicas,
              join and heartbeat timeouts)
  wire        the host-side transport: a gRPC peer server per slice (packed FP4
              codes of each fragment's pseudo-gradient; outer-state snapshots
              for healing), byte counters
  slice       ElasticSlice: the Streaming DiLoCo schedule and pure outer update
              of streaming_diloco, with the exchange among the live quorum and
              healing of (re)joining slices
  toy         a tiny regression task for CPU runs (tests, the demo)
  run_slice   one slice's command line
"""
