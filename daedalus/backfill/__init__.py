"""The ETL fanned out over Dask (``daedalus etl --dask local:N|tcp://HOST:8786``), with a result
identical to the sequential ETL: the same files, byte for byte, and the same checkpoint.

The plan follows the data::

    segments (time order)      phase 1: per segment group         phase 2: per product, in order
    ---------------------      -----------------------------      ------------------------------
    seg 1 ─┐                   parse[1..k]  ── tickers, candles   BTC-USD: chain[g1] → chain[g2] → …
    seg 2 ─┼─ group 1 (≥64 MB) ──► parquet + per-product book      ETH-USD: chain[g1] → chain[g2] → …
    …      │                       input (Arrow IPC) + result      …         (books, level2, samples,
    seg n ─┘  group 2 …        parse[k+1..] …                                  trades, bars)
                                     │  barrier: the products          │
                                     └─ and connections, in order ─────┘
                                                                       ▼
                                              commit: files into place, merged checkpoint,
                                              committed list, segments archived/deleted

- **Phase 1** (:func:`daedalus.backfill.tasks.parse_segments`) does the stateless work of each
  segment: reading and decoding (the expensive part), the bad-line handling of the sequential
  job, tickers and candles written, and each product's *compact book input*: the frames with
  its level2 rows, the control lines, and every other run of frames folded into one
  sequence-number run (:mod:`daedalus.backfill.intermediate`), so a product's chain reads its
  own frames, not everyone's, and still sees every connection's gaps.
- **Phase 2** (:func:`daedalus.backfill.tasks.run_chain`) runs, per product, the unchanged
  segment pass (:class:`daedalus.etl.coinbase_run.SegmentRun`) over that input, segment group
  after segment group: books (one product's, plus every connection's sequence position),
  level2 and book samples, trade de-duplication, bars. The small cross-segment state (book,
  recent trade ids, open bars, sequence positions) goes from one group's task to the next as
  a checkpoint file in the scratch folder; Dask passes only its folder name.
- **Commit** (:class:`daedalus.backfill.run.Backfill`): outputs renamed into the processed
  tree, the chains' states merged into the checkpoint the sequential run would have written
  (:mod:`daedalus.backfill.state`), the segments recorded as committed, then deleted or
  archived. A note (``commit.json``) makes a commit cut short finish on the next run.

Every task writes into a fresh temporary folder and renames it into place when done: a task
killed anywhere (worker SIGKILL) is simply run again by Dask, and a whole backfill killed
anywhere (client SIGKILL) reruns reusing every finished task. The scheduler only ever sees
small dicts and folder names.
"""
