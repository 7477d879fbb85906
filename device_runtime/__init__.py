"""What runs on the device: patch verification and application (`patch`), the weight-map
contract (`weight_map`), runners for LiteRT / ONNX Runtime / Core ML (`runners`), latency
benchmarking and host device profiles (`bench`, `profiles`, `adb`), and the client of
`mntool serve` (`client`). Numpy and the runtimes only: never torch, never `mntool`."""
