"""fastbn's command line: ``python -m fastbn {demo,info,bench} ...``.

demo   BatchNorm2d on a tiny input, with the first output recomputed by hand.
info   this build and machine: versions, SIMD variant dispatched to, OpenMP runtime, threads
       (``fastbn.show_config()``); ``--json`` for the same as JSON.
bench  fastbn against its peers and the memory-bandwidth floor.
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="BatchNorm2d on a tiny input, checked by hand")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")

    info = commands.add_parser("info", help="versions, SIMD variant, OpenMP runtime and threads of this build")
    info.add_argument("--json", action="store_true", help="print the configuration as JSON")

    bench = commands.add_parser("bench", help="time fastbn against its peers and the bandwidth floor")
    bench.add_argument("--quick", action="store_true", help="fewer shapes, shorter timings")
    bench.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    bench.add_argument("--against", default="torch,onnxruntime,numpy",
                       help="comma-separated peers among torch, onnxruntime, numpy (missing ones are skipped)")
    bench.add_argument("--ops", default="eval,train,train+backward",
                       help="operations to time: eval, train, train+backward, and feature variants "
                            "such as train+relu, train:nhwc, eval:fp16 (see fastbn.bench.VARIANTS)")
    bench.add_argument("--shapes", default=None,
                       help="semicolon-separated shapes, e.g. '32,64,56,56;4096,1024' (default: the suite)")
    bench.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32",
                       help="dtype of the data (default float32; the fp16 variants use float16; "
                            "half data goes into float32 modules, torch's too; bfloat16 needs ml_dtypes)")
    bench.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                       help="seconds each implementation is timed for, per case, over all rounds "
                            "(default 0.25, 0.05 with --quick; more on a noisy machine)")
    bench.add_argument("--json", dest="json_path", metavar="F", help="also write the results to F as JSON")
    bench.add_argument("--plot", dest="plot_path", metavar="F.png",
                       help="also draw the speed-ups into F.png (needs matplotlib)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run
        return 0 if run(seed=args.seed) else 1
    if args.command == "info":
        from ._config import config_json, show_config
        if args.json:
            print(config_json())
        else:
            show_config()
        return 0
    if args.command == "bench":
        from . import bench as bench_module
        try:
            threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
            shapes = ([tuple(int(n) for n in s.split(",")) for s in args.shapes.split(";") if s.strip()]
                      if args.shapes else None)
        except ValueError:
            parser.error("--threads takes integers like 1,2 and --shapes takes shapes like '32,64,56,56;4096,1024'")
        if not threads or min(threads) < 1:
            parser.error("--threads must list positive integers")
        if args.budget is not None and not (0 < args.budget <= 600):
            parser.error("--budget must be a number of seconds in (0, 600]")
        against = tuple(p.strip() for p in args.against.split(",") if p.strip())
        unknown = set(against) - set(bench_module.PEERS)
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        if unknown:
            parser.error(f"unknown peer(s) {sorted(unknown)}; choose from {list(bench_module.PEERS)}")
        known = list(bench_module.OPS) + list(bench_module.VARIANTS)
        if set(ops) - set(known):
            parser.error(f"unknown op(s) {sorted(set(ops) - set(known))}; choose from {known}")
        bench_module.main(threads=threads, against=against, quick=args.quick, json_path=args.json_path,
                          plot_path=args.plot_path, shapes=shapes, ops=ops, dtype=args.dtype,
                          budget=args.budget)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
