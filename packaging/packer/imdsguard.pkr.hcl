# Packer example: bake imdsguard into an Amazon Linux 2023 golden AMI.
#
#   make rpm            (once per architecture: on x86_64 and on aarch64)
#   packer init packaging/packer && packer build \
#     -var rpm_x86_64=build/rpm/RPMS/x86_64/imdsguard-0.1.0-1.x86_64.rpm \
#     -var rpm_aarch64=build/rpm/RPMS/aarch64/imdsguard-0.1.0-1.aarch64.rpm packaging/packer
#   (one architecture only: packer build -only='*.al2023-arm64' ...)
#
# The provisioners are the part to copy into an existing template. They
# install and enable imdsguard but do not start it: it starts on the image's
# first boot, before the network, and nothing it writes at run time is baked.
# See docs/ami.md.

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

variable "rpm_x86_64" {
  type        = string
  default     = ""
  description = "Path to the x86_64 imdsguard RPM built by `make rpm`."
}

variable "rpm_aarch64" {
  type        = string
  default     = ""
  description = "Path to the aarch64 (Graviton) imdsguard RPM built by `make rpm`."
}

variable "allow_users" {
  type        = list(string)
  default     = ["root"]
  description = "allow.users: keep root (cloud-init, the SSM agent, amazon-ec2-net-utils)."
}

variable "region" {
  type    = string
  default = "us-east-1"
}

locals {
  # A sortable UTC stamp for AMI names (Packer's timestamp(), without separators).
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
}

# What both architectures share; the build block adds what differs (a build-level
# source block may only fill in fields this one leaves unset).
source "amazon-ebs" "al2023" {
  region       = var.region
  ssh_username = "ec2-user"

  # IMDSv2 only on the build instance and on instances launched from the AMI.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"
}

build {
  # x86_64.
  source "source.amazon-ebs.al2023" {
    name          = "al2023"
    instance_type = "t3.small"
    ami_name      = "golden-al2023-x86_64-imdsguard-${local.timestamp}"
    source_ami_filter {
      filters     = { name = "al2023-ami-2023.*-x86_64", virtualization-type = "hvm" }
      owners      = ["amazon"]
      most_recent = true
    }
  }

  # Graviton: the same image for aarch64 (the RPM is per architecture).
  source "source.amazon-ebs.al2023" {
    name          = "al2023-arm64"
    instance_type = "t4g.small"
    ami_name      = "golden-al2023-arm64-imdsguard-${local.timestamp}"
    source_ami_filter {
      filters     = { name = "al2023-ami-2023.*-arm64", virtualization-type = "hvm" }
      owners      = ["amazon"]
      most_recent = true
    }
  }

  provisioner "file" {
    source      = source.name == "al2023-arm64" ? var.rpm_aarch64 : var.rpm_x86_64
    destination = "/tmp/imdsguard.rpm"
  }

  provisioner "shell" {
    execute_command = "sudo sh -eux '{{ .Path }}'"
    inline = [
      "dnf install -y /tmp/imdsguard.rpm",
      "rm -f /tmp/imdsguard.rpm",
      "umask 022; printf 'mode: enforce\\nallow:\\n  users: [%s]\\n' '${join(", ", var.allow_users)}' > /etc/imdsguard/config.yaml",
      "imdsguard check-config",
      "rpm -V --noconfig imdsguard",
      "systemctl enable imdsguard.service",
      "test \"$(systemctl is-enabled imdsguard.service)\" = enabled",
      # Never bake per-instance state, the event log or /run.
      "systemctl stop imdsguard.service || true",
      "rm -rf /var/lib/imdsguard /var/log/imdsguard /run/imdsguard",
    ]
  }
}
