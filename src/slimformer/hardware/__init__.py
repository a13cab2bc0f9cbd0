"""hls4ml FPGA projects and C simulation: filled by the hardware issue."""
