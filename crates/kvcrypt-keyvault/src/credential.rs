//! Builds the Entra ID credential selected by `[vault.credential]`, routed through our reqwest
//! client and retry policy.

use super::KeyError;
use super::config::{CredentialConfig, VaultConfig, read_secret, secret_text};
use super::http::identity_client_options;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, SecretBytes, TokenCredential};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientCertificateCredential,
    ClientCertificateCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use std::sync::Arc;

fn sdk_err(what: &str, e: azure_core::Error) -> KeyError {
    KeyError::Config(format!("cannot set up the {what} credential: {e}"))
}

pub(crate) fn build_credential(
    cfg: &VaultConfig,
    identity_client: &reqwest::Client,
) -> Result<Arc<dyn TokenCredential>, KeyError> {
    // A custom cloud only changes the authority host: the Key Vault audience comes from the
    // vault's own challenge, so no audience table is needed.
    let cloud = cfg.authority_host.as_ref().map(|host| {
        let mut custom = CustomConfiguration::default();
        custom.authority_host = host.trim_end_matches('/').to_owned();
        Arc::new(CloudConfiguration::from(custom))
    });
    let options = || identity_client_options(identity_client, cfg, cloud.clone());

    Ok(match &cfg.credential {
        CredentialConfig::ManagedIdentity(m) => {
            let user_assigned_id = match (&m.client_id, &m.object_id, &m.resource_id) {
                (Some(id), _, _) => Some(UserAssignedId::ClientId(id.clone())),
                (_, Some(id), _) => Some(UserAssignedId::ObjectId(id.clone())),
                (_, _, Some(id)) => Some(UserAssignedId::ResourceId(id.clone())),
                _ => None,
            };
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id,
                client_options: options(),
            }))
            .map_err(|e| sdk_err("managed identity", e))?
        }
        CredentialConfig::ClientSecret(c) => {
            let bytes = read_secret("secret", &c.secret_file, &c.secret_credential)?
                .ok_or_else(|| KeyError::Config("vault.credential: no client secret".into()))?;
            let secret = secret_text("client secret", bytes)?;
            ClientSecretCredential::new(
                &c.tenant_id,
                c.client_id.clone(),
                Secret::new(secret),
                Some(ClientSecretCredentialOptions {
                    client_options: options(),
                }),
            )
            .map_err(|e| sdk_err("client secret", e))?
        }
        CredentialConfig::ClientCertificate(c) => {
            let pkcs12 = read_secret(
                "certificate",
                &c.certificate_file,
                &c.certificate_credential,
            )?
            .ok_or_else(|| KeyError::Config("vault.credential: no certificate".into()))?;
            let password = read_secret("password", &c.password_file, &c.password_credential)?
                .map(|b| secret_text("certificate password", b))
                .transpose()?
                .map(Secret::new);
            ClientCertificateCredential::new(
                c.tenant_id.clone(),
                c.client_id.clone(),
                SecretBytes::new(pkcs12.to_vec()),
                Some(ClientCertificateCredentialOptions {
                    client_options: options(),
                    password,
                }),
            )
            .map_err(|e| sdk_err("client certificate (PKCS#12)", e))?
        }
        CredentialConfig::WorkloadIdentity(c) => {
            // Fail early and clearly; the SDK would only say so at the first token request.
            std::fs::metadata(&c.token_file).map_err(|e| {
                KeyError::Config(format!(
                    "vault.credential.token_file {}: {e}",
                    c.token_file.display()
                ))
            })?;
            WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                credential_options: azure_identity::ClientAssertionCredentialOptions {
                    client_options: options(),
                },
                client_id: Some(c.client_id.clone()),
                tenant_id: Some(c.tenant_id.clone()),
                token_file_path: Some(c.token_file.clone()),
            }))
            .map_err(|e| sdk_err("workload identity", e))?
        }
        CredentialConfig::AzureCli(c) => AzureCliCredential::new(Some(AzureCliCredentialOptions {
            tenant_id: c.tenant_id.clone(),
            ..Default::default()
        }))
        .map_err(|e| sdk_err("Azure CLI", e))?,
    })
}
