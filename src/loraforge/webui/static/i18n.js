// English and Chinese text of the page. Config keys and their help stay as the CLI writes them (they are what
// the YAML holds); everything else is switched here, at any time, without reloading.
"use strict";

const TEXT = {
  en: {
    title: "loraforge web UI", lang: "中文", config_file: "Config file", load: "Load", save_as: "Save as",
    save: "Save", tab_data: "Data", tab_train: "Train", tab_eval: "Evaluate", tab_chat: "Chat", tab_export: "Export",
    model: "Model", template: "Template", method: "Method", quant: "Quantization", none: "none",
    yaml: "YAML that runs", command: "Equivalent command line", problems: "Problems in the config",
    no_problems: "The config is valid.", estimate: "Memory estimate", gpu: "GPU", detected: "detected",
    start: "Start", stop: "Stop (save checkpoint)", resume: "Resume", progress: "Progress", step: "Step",
    eta: "ETA", elapsed: "Elapsed", tokens_s: "tokens/s", loss: "Loss", log: "Log", state: "State",
    more: "more", datasets: "Datasets", dataset_dir: "dataset_dir", name: "Name", file: "File",
    formatting: "Format", exists: "exists", preview: "Preview", index: "Row", split: "Split",
    check: "Check data", register: "Register a file", convert: "Convert JSONL to ShareGPT", input: "Input",
    output: "Output", limit: "Row limit", trained_legend: "highlighted = trained tokens", adapter: "Adapter",
    eval_out: "Results folder", predict: "Predict (BLEU-4 / ROUGE / exact match)", compare: "Compare base vs adapter",
    variants: "Variants", results: "Results", load_base: "Load base", load_adapter: "Load adapter",
    unload: "Unload", thinking: "Thinking", side_by_side: "Same question to both", send: "Send", clear: "Clear",
    max_new_tokens: "Max new tokens", base_model: "Base model", finetuned: "Fine-tuned", not_loaded: "not loaded",
    export_dir: "Export folder", export_format: "Format", gguf_type: "GGUF type", ollama: "Ollama Modelfile",
    hub_id: "Hub repository (optional)", dry_run: "Dry run (plan only)", run_export: "Export",
    overwrite: "Replace existing folder", files: "Files", running: "running", finished: "finished",
    stopped: "stopped (resumable)", failed: "failed", lost: "lost", job: "Job", fits: "fits", not_fits: "does NOT fit",
    no_gpu: "no GPU detected: pick one to get a verdict", tpl_warning: "Template differs from the tokenizer's chat template",
    message: "Type a message", system: "System prompt", error: "Error", saved: "Saved", loading: "loading...",
    unknown_keys: "Keys no config field declares (fix or remove them):",
    unreachable: "The web UI is not reachable (restarting?); the job keeps running. Retrying...",
  },
  zh: {
    title: "loraforge 网页界面", lang: "English", config_file: "配置文件", load: "加载", save_as: "另存为",
    save: "保存", tab_data: "数据", tab_train: "训练", tab_eval: "评估", tab_chat: "对话", tab_export: "导出",
    model: "模型", template: "对话模板", method: "微调方法", quant: "量化", none: "无",
    yaml: "实际运行的 YAML", command: "等价的命令行", problems: "配置中的问题",
    no_problems: "配置有效。", estimate: "显存估算", gpu: "GPU", detected: "自动检测",
    start: "开始", stop: "停止（保存检查点）", resume: "继续训练", progress: "进度", step: "步数",
    eta: "预计剩余", elapsed: "已用时间", tokens_s: "词元/秒", loss: "损失", log: "日志", state: "状态",
    more: "更多", datasets: "数据集", dataset_dir: "数据目录", name: "名称", file: "文件",
    formatting: "格式", exists: "存在", preview: "预览", index: "行号", split: "划分",
    check: "检查数据", register: "注册数据文件", convert: "JSONL 转 ShareGPT", input: "输入",
    output: "输出", limit: "行数上限", trained_legend: "高亮 = 参与训练的词元", adapter: "适配器",
    eval_out: "结果目录", predict: "预测（BLEU-4 / ROUGE / 完全匹配）", compare: "对比基座与适配器",
    variants: "对比项", results: "结果", load_base: "加载基座", load_adapter: "加载适配器",
    unload: "卸载", thinking: "思考模式", side_by_side: "同一问题问两个模型", send: "发送", clear: "清空",
    max_new_tokens: "最大生成词元数", base_model: "基座模型", finetuned: "微调后", not_loaded: "未加载",
    export_dir: "导出目录", export_format: "格式", gguf_type: "GGUF 类型", ollama: "Ollama Modelfile",
    hub_id: "Hub 仓库（可选）", dry_run: "试运行（只看计划）", run_export: "导出",
    overwrite: "覆盖已有目录", files: "文件", running: "运行中", finished: "已完成",
    stopped: "已停止（可继续）", failed: "失败", lost: "丢失", job: "任务", fits: "放得下", not_fits: "放不下",
    no_gpu: "未检测到 GPU：请选择一个 GPU 以得到结论", tpl_warning: "模板与分词器自带的对话模板不一致",
    message: "输入消息", system: "系统提示词", error: "错误", saved: "已保存", loading: "加载中...",
    unknown_keys: "未知的配置键（请修改或删除）：",
    unreachable: "无法连接网页界面（正在重启？）；任务仍在运行。正在重试...",
  },
};

let LANG = localStorage.getItem("loraforge.lang") || "en";

function t(key) {
  return (TEXT[LANG] && TEXT[LANG][key]) || TEXT.en[key] || key;
}

function applyLanguage() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-ph]").forEach((el) => { el.placeholder = t(el.dataset.i18nPh); });
}

function toggleLanguage() {
  LANG = LANG === "en" ? "zh" : "en";
  localStorage.setItem("loraforge.lang", LANG);
  applyLanguage();
  document.dispatchEvent(new Event("languagechange"));
}
